"""`s2amnet bench --line`: what recording and publishing cost. Two `s2amnet serve` processes with the same model:
one with every result recorded (SQLite in a temporary folder, failed parts' images kept), published to an MQTT
broker (a local `mosquitto`, when installed) and served over OPC UA; one with all of that off. The same
closed-loop client drives both at one concurrency (16 by default), in alternating slices so that both see the
same spells of a shared machine. Reported: images/s and p50/p99 of each, their ratio, and what the line server
says it recorded and published (every answered result, or the benchmark says how many were missed).
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm


def add_arguments(p) -> None:
    p.add_argument("--line", action="store_true",
                   help="also measure the cost of recording and publishing every result (records, MQTT, OPC UA) "
                        "against the same service with them off")
    p.add_argument("--line-concurrency", type=int, default=16, help="requests in flight for --line (default 16)")
    p.add_argument("--line-requests", type=int, default=240, help="requests per server for --line (default 240)")


@contextlib.contextmanager
def _mosquitto(tmp: Path):
    """A local mosquitto on a free port (None when it is not installed)."""
    from app.commands.bench import _free_port

    exe = shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if Path(p).exists()), None)
    if exe is None:
        yield None
        return
    port = _free_port()
    conf = tmp / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n")
    proc = subprocess.Popen([exe, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import socket

        for _ in range(100):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
            time.sleep(0.05)
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def _integrations(url: str) -> dict[str, Any]:
    import httpx

    return httpx.get(url + "/readyz", timeout=10).json().get("integrations") or {}


def _settled(url: str, sent: int, timeout: float = 60.0) -> dict[str, Any]:
    """The line server's outlets once each has handled ``sent`` results (or after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        health = _integrations(url)
        done = all(h.get("written", h.get("published", 0)) + h.get("dropped", 0) >= sent for h in health.values())
        if done or time.monotonic() > deadline:
            return health
        time.sleep(0.2)


def bench_line(folder: Path, task: str, input_size: list[int], args, device: str, progress: bool) -> dict[str, Any]:
    import numpy as np

    from app.client import _image_bytes
    from app.commands.bench import _free_port, _launch, _process_env, _serve_cmd, _summary, run_round

    part = _image_bytes(np.random.default_rng(2).integers(0, 256, (*input_size, 3), dtype=np.uint8))
    path, c, n = f"/{task}", args.line_concurrency, args.line_requests
    with tempfile.TemporaryDirectory(prefix="s2amnet-bench-line-") as tmp_name, contextlib.ExitStack() as stack:
        tmp = Path(tmp_name)
        mqtt = stack.enter_context(_mosquitto(tmp))
        line_env = {"S2AMNET_RECORDS": "true", "S2AMNET_RECORDS_DIR": str(tmp / "records"),
                    "S2AMNET_RECORD_IMAGES": "fail",
                    "S2AMNET_OPCUA_ENDPOINT": f"opc.tcp://127.0.0.1:{_free_port()}/s2amnet/",
                    **({"S2AMNET_MQTT_URL": mqtt} if mqtt else {})}
        servers = {"off": {}, "line": line_env}  # the benchmark's servers record nothing unless told
        urls = {}
        for name, env in servers.items():
            port = _free_port()
            url = f"http://127.0.0.1:{port}"
            stack.enter_context(_launch(_serve_cmd(folder, device, args.threads, port), _process_env(**env),
                                        url + "/readyz", tmp / f"{name}.log", what=f"the {name} server"))
            urls[name] = url
        bar = tqdm(total=2 * n + 4, desc="line", unit="req", disable=not progress, leave=False)
        for url in urls.values():
            run_round(url, path, part, 2, 1, bar)  # warm-up
        acc: dict[str, tuple[list[float], dict[int, int], float]] = {k: ([], {}, 0.0) for k in urls}
        for k in (len(s) for s in (range(n)[i::4] for i in range(4)) if len(s)):
            for name, url in urls.items():
                lat, st, wall = run_round(url, path, part, k, c, bar)
                lat0, st0, wall0 = acc[name]
                acc[name] = (lat0 + lat, {s: st0.get(s, 0) + st.get(s, 0) for s in {*st0, *st}}, wall0 + wall)
        bar.close()
        health = _settled(urls["line"], n + 2)
    rounds = {name: _summary(c, *acc[name]) for name in urls}
    off, on = rounds["off"]["requests_per_s"], rounds["line"]["requests_per_s"]
    return {"model": folder.name, "endpoint": path, "concurrency": c, "requests": n, "rounds": rounds,
            "throughput_ratio": round(on / off, 3), "cost_pct": round(100.0 * (1.0 - on / off), 1),
            "outlets": health, "mqtt": bool(mqtt)}


def line_markdown(r: dict[str, Any]) -> list[str]:
    off, on = r["rounds"]["off"], r["rounds"]["line"]
    outlets = ", ".join(f"{name}: {h.get('written', h.get('published', 0))} of {r['requests'] + 2}"
                        + (f" ({h['dropped']} dropped)" if h.get("dropped") else "")
                        for name, h in r["outlets"].items())
    return ["## Line integration: the cost of recording and publishing every result", "",
            f"`s2amnet serve` with {r['model']} twice: every result recorded (SQLite, failed parts' images kept), "
            + ("published to a local mosquitto (MQTT, QoS 1) " if r["mqtt"] else "(no mosquitto installed: MQTT off) ")
            + f"and served over OPC UA; and the same with all of that off. {r['requests']} requests each at "
            f"concurrency {r['concurrency']}, in alternating slices.", "",
            "| server | images / s | p50 ms | p95 ms | errors |", "|---|---|---|---|---|",
            f"| off | {off['requests_per_s']:.1f} | {off['p50_ms']:.0f} | {off['p95_ms']:.0f} | "
            f"{off['requests'] - off['ok']} |",
            f"| recorded + published | {on['requests_per_s']:.1f} | {on['p50_ms']:.0f} | {on['p95_ms']:.0f} | "
            f"{on['requests'] - on['ok']} |", "",
            f"Throughput with recording and publishing: {r['throughput_ratio']:.3f}× of without "
            f"(cost {r['cost_pct']:.1f} %). Handled by the outlets (warm-up included): {outlets}.", ""]
