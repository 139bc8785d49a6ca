"""`s2amnet bench` as a user runs it: a real process that times the models and a real `s2amnet serve`."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from support.harness import ROOT, process_env
from support.weights import make_weights

from app.cli import main


def test_bench_times_models_and_the_service_and_writes_markdown_and_png(tmp_path):
    weights = make_weights(tmp_path / "weights", names=["cls", "det"])
    out, png = tmp_path / "BENCHMARKS.md", tmp_path / "bench.png"
    part = tmp_path / "part.png"  # the service part sends a real image of the line when given one
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40), dtype=np.uint8)).save(part)
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--weights", str(weights / "cls"), str(weights / "det"),
         "--batch-sizes", "2", "--iters", "2", "--requests", "6", "--concurrency", "3", "--threads", "1",
         "--device", "cpu", "--http-image", str(part), "--out", str(out), "--plot", str(png), "--json"],
        cwd=ROOT, env=process_env(PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    assert [m["model"] for m in result["models"]] == ["cls", "det"]
    for m in result["models"]:
        assert [r["batch"] for r in m["rows"]] == [1, 2]  # batch 1 is always measured: gains are against it
        assert m["rows"][0]["gain_vs_batch1"] == 1.0
        for r in m["rows"]:
            assert r["ms_per_image"] > 0
            assert r["images_per_s"] == pytest.approx(1000 / r["ms_per_image"], rel=0.01)
        assert m["rows"][1]["gain_vs_batch1"] == pytest.approx(
            m["rows"][1]["images_per_s"] / m["rows"][0]["images_per_s"], abs=0.01)
        f = m["forward_batch"]  # on a CPU: what S2AMNET_FORWARD_BATCH=auto would pick, and what it gains
        assert f["chosen"] in (1, 2) and f["batch"] == 2 and list(f["measured_ms_per_image"])[0] == "1"
        assert f["ms_per_image_whole"] == m["rows"][1]["ms_per_image"]
        assert f["gain"] == pytest.approx(f["ms_per_image_whole"] / f["ms_per_image_chosen"], abs=0.01)
        if f["chosen"] == 2:  # nothing split: the same timings
            assert f["ms_per_image_chosen"] == f["ms_per_image_whole"]
        bn = m["batchnorm_folding"]  # the served (folded) model against the same weights unfused, batch 1
        assert bn["batch"] == 1 and bn["ms_per_image_unfused"] > 0
        assert bn["gain"] == pytest.approx(bn["ms_per_image_unfused"] / m["rows"][0]["ms_per_image"], rel=0.01)

    service = result["service"]  # the first --weights folder, through real HTTP
    assert service["model"] == "cls" and service["endpoint"] == "/classify"
    assert service["image"] == "40x30 PNG (part.png, 1 KiB)"
    # one at a time, 3 in flight, and 3 in flight against a second server without batching
    assert [(r["concurrency"], r["max_batch_size"]) for r in service["rounds"]] == [(1, "default"),
                                                                                   (3, "default"), (3, "1")]
    for r in service["rounds"]:
        assert r["requests"] == r["ok"] == 6 and r["statuses"] == {"200": 6}
        assert 0 < r["p50_ms"] <= r["p95_ms"]
    seq, conc, unbatched = service["rounds"]
    assert service["batching_gain"] == pytest.approx(conc["requests_per_s"] / unbatched["requests_per_s"],
                                                     abs=0.01)
    assert service["concurrency_gain"] == pytest.approx(conc["requests_per_s"] / seq["requests_per_s"], abs=0.01)
    alone = service["alone_ms"]  # one at a time: where the time goes, from the answers' own timing_ms
    assert alone["p50"] == seq["p50_ms"] and alone["queue"] >= 0 and 0 < alone["inference"] <= alone["p50"]
    # the bare forward it is compared with: timed in the bench process in blocks between those requests
    assert 0 < alone["forward"] < alone["p50"]
    assert service["http_overhead_vs_forward"] == pytest.approx(seq["p50_ms"] / alone["forward"], rel=0.02)
    over = alone["over_forward"]  # each block's p50 less the median of the block of forwards timed before it
    assert over["blocks"] == 3  # 6 requests in three slices of 2: a block of forwards before each slice
    assert 0.2 < over["p25"] <= over["p50"] <= over["p75"] < alone["p50"]  # ms: HTTP alone takes more than 0.2
    # S2AMNET_BACKEND unset: the service runs the CPU's default, and so does the bare forward it is compared with
    assert result["machine"]["service_backend"] == "eager-channels-last (default)"
    assert alone["forward_backend"] == "eager-channels-last"

    md = out.read_text()
    assert md.startswith("# Benchmarks") and "| cls 1 | classify | 64x64 | none | 2 |" in md
    assert "## Forward batch" in md and "| cls | " in md
    fold = result["models"][0]["batchnorm_folding"]
    assert "BatchNorm folded into the convs" in md and f"cls {fold['gain']:.2f}×" in md
    assert "## Service" in md and "Dynamic batching gain" in md and "| 3 | 1 | 6 | 6 |" in md
    assert f"median + {over['p50']:.1f} ms, quartiles + {over['p25']:.1f} to + {over['p75']:.1f} ms" in md
    assert f"One at a time, p50 {alone['p50']:.1f} ms" in md
    assert f"forward {alone['forward']:.1f} ms (eager-channels-last, " in md
    assert "backend eager-channels-last (default) (`S2AMNET_BACKEND`)" in md
    assert md.strip() in proc.stdout  # the same report is printed
    # --merge: this run's Service section, with its own command line, replaces only that section of a report
    from types import SimpleNamespace

    from app.commands.bench_peers import out_text

    report = tmp_path / "REPORT.md"
    report.write_text("# Benchmarks\n\n## Models\n\nkept\n\n## Service: old\n\nold\n\n## Peers: p\n\nkept too\n")
    merged = out_text(SimpleNamespace(merge=True, out=str(report)), {**result, "models": []}, "")
    section = merged.split("## Service: `s2amnet serve`")[1].split("## Peers")[0]
    assert merged.startswith("# Benchmarks\n\n## Models\n\nkept\n") and merged.endswith("## Peers: p\n\nkept too\n")
    assert "old" not in merged and "`s2amnet bench --weights" in section
    assert "backend eager-channels-last (default)." in section
    assert "| 3 | 1 | 6 | 6 |" in section
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


@pytest.mark.parametrize(("args", "message"), [
    (["--weights", "/nonexistent/model"], "not a weights folder"),
    (["--batch-sizes", "0"], "--batch-sizes must be integers >= 1"),
    (["--batch-sizes", "one"], "comma-separated integers"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--requests", "0"], "--requests must be >= 1"),
    (["--concurrency", "1"], "--concurrency must be >= 2 (one at a time is always measured), got 1"),
    (["--http-model", "/nonexistent/model"], "--http-model"),
    (["--http-image", "/nonexistent/part.jpg"], "--http-image /nonexistent/part.jpg: no such file"),
])
def test_bench_rejects_bad_options_with_a_message(args, message, tmp_path, capsys):
    weights = make_weights(tmp_path / "weights", names=["cls"])
    out = tmp_path / "BENCHMARKS.md"
    argv = ["bench", *(["--weights", str(weights / "cls")] if "--weights" not in args else []), *args,
            "--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not out.exists()  # refused before any work


def test_bench_refuses_a_merge_without_out_and_a_service_backend_that_does_not_exist(tmp_path, monkeypatch, capsys):
    weights = make_weights(tmp_path / "weights", names=["cls"])
    assert main(["bench", "--weights", str(weights / "cls"), "--merge"]) == 2
    assert capsys.readouterr().err.startswith("error: --merge needs --out")
    monkeypatch.setenv("S2AMNET_BACKEND", "tensorrt")
    assert main(["bench", "--weights", str(weights / "cls"), "--out", str(tmp_path / "B.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: S2AMNET_BACKEND=tensorrt: not one of auto, eager, eager-channels-last, eager-bf16, "
                          "compile")


def test_the_report_names_the_backends_the_service_runs(monkeypatch):
    from app.commands.bench import service_backend

    monkeypatch.delenv("S2AMNET_BACKEND", raising=False)
    monkeypatch.delenv("S2AMNET_MODEL_BACKEND", raising=False)
    assert service_backend("cpu") == "eager-channels-last (default)" and service_backend("cuda:0") == "eager (default)"
    monkeypatch.setenv("S2AMNET_BACKEND", "compile")
    monkeypatch.setenv("S2AMNET_MODEL_BACKEND", " det = onnxruntime , seg=eager")  # read as the service reads it
    assert service_backend("cpu") == "compile (det=onnxruntime,seg=eager)"


def test_bench_without_weights_needs_a_weights_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no ./weights here
    assert main(["bench", "--out", str(tmp_path / "B.md")]) == 2
    assert capsys.readouterr().err.startswith("error: no --weights given and weights folder 'weights' does not exist")
    (tmp_path / "weights" / "notes").mkdir(parents=True)  # a folder without manifest.json is not a model
    assert main(["bench", "--out", str(tmp_path / "B.md")]) == 2
    assert "no model folders (with manifest.json)" in capsys.readouterr().err


def test_bench_tunes_the_allocator_as_the_service_setting_says(tmp_path, monkeypatch, capsys):
    """The timed forwards run like the service's: S2AMNET_ALLOCATOR_TUNING=false leaves glibc's allocator
    alone (recorded in the results), the default tunes it, and a bad value is an error before any work."""
    import app.runtime as runtime

    weights = make_weights(tmp_path / "weights", names=["cls"])
    calls = []
    monkeypatch.setattr(runtime, "tune_allocator", lambda: calls.append(1) or True)
    argv = ["bench", "--weights", str(weights / "cls"), "--no-http", "--batch-sizes", "1", "--iters", "1",
            "--threads", "1", "--device", "cpu", "--json"]
    for value, tuned in (("false", False), (None, True)):
        if value is None:
            monkeypatch.delenv("S2AMNET_ALLOCATOR_TUNING", raising=False)
        else:
            monkeypatch.setenv("S2AMNET_ALLOCATOR_TUNING", value)
        calls.clear()
        assert main(argv) == 0
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["machine"]["allocator_tuning"] is tuned and len(calls) == int(tuned)
    monkeypatch.setenv("S2AMNET_ALLOCATOR_TUNING", "sometimes")
    calls.clear()
    assert main(argv) == 2 and not calls
    err = capsys.readouterr().err
    assert err.startswith("error: service settings from the environment") and "allocator_tuning" in err


def test_bench_backends_times_the_listed_backends_in_the_same_rounds_each_at_its_best_batch(exported_classifier,
                                                                                         tmp_path):
    """The service's export cache (S2AMNET_CACHE_DIR) already holds the model's graph: the benchmark uses it."""
    pytest.importorskip("onnxruntime")
    ov = pytest.importorskip("openvino")
    folder, cache = exported_classifier
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n\n## Models\n\nkept\n\n## Backends: old\n\nold rows\n\n## Service\n\nalso kept\n")
    proc = subprocess.run(
        [sys.executable, "-m", "app.cli", "bench", "--weights", str(folder), "--no-http",
         "--backends", "onnxruntime,openvino,openvino-bf16", "--batch-sizes", "1", "--iters", "2", "--threads", "1",
         "--device", "cpu", "--out", str(out), "--merge", "--json"],
        cwd=ROOT, env=process_env(PYTHONPATH=str(ROOT), S2AMNET_CACHE_DIR=str(cache)),
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (b,) = json.loads(proc.stdout.strip().splitlines()[-1])["backends"]
    assert b["model"] == "cls" and b["cached"] and b["export_s"] is None
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    ran = {"eager", "onnxruntime", "openvino"} | ({"openvino-bf16"} if has_bf16 else set())
    assert {n: p["ok"] for n, p in b["parity"].items() if n != "openvino-bf16"} == {"onnxruntime": True,
                                                                                      "openvino": True}
    assert set(b["missing"]) == ({"openvino-bf16"} - ran) and "compile" not in b["parity"]  # not listed
    assert set(b["best"]) == ran and b["best"]["eager"]["gain"] == 1.0
    assert b["rows"][0]["batch"] == 1 and {r["batch"] for r in b["rows"]} == {1, *b["best_batch"].values()}
    for r in b["rows"]:
        ms = r["ms_per_image"]
        assert set(ms) == ran and min(ms.values()) > 0
        for name in ran - {"eager"}:
            assert r["gain"][name] == pytest.approx(ms["eager"] / ms[name], abs=0.01)
    for name, best in b["best"].items():  # each at its fastest batch in the rounds; gain against eager's best
        assert best["ms_per_image"] == pytest.approx(min(r["ms_per_image"][name] for r in b["rows"]), abs=0.01)
        assert best["gain"] == pytest.approx(b["best"]["eager"]["ms_per_image"] / best["ms_per_image"], abs=0.01)
    # the work per second: counted GFLOPs per image over each one's time, beside a matrix product's rate
    from app.commands.bench_report import machine
    from app.commands.info import forward_gflops
    from model import backends
    from model.predictor import Predictor

    predictor = Predictor.from_folder(folder)
    assert b["gflop_per_image"] == pytest.approx(forward_gflops(predictor.model, *predictor.input_size), abs=1e-3)
    assert b["gflop_per_image"] > 0 and b["matmul_gflops"]["fp32"] > 0
    # bf16 units (as the eager-bf16 backend finds them), unless torch's kernels are limited below AVX-512
    bf16_units = backends.cpu_has_bf16_units() and machine("cpu")["kernels"].startswith("AVX512")
    assert set(b["matmul_gflops"]) == ({"fp32", "bf16"} if bf16_units else {"fp32"})
    for best in b["best"].values():
        assert best["gflops"] == pytest.approx(b["gflop_per_image"] / best["ms_per_image"] * 1000.0, rel=0.02)
    text = out.read_text()  # --merge: only the Backends section replaced, with its own command line
    assert "## Backends: eager PyTorch" in text and "| cls 1 | 1 |" in text and "old rows" not in text
    work = next(line for line in text.splitlines() if line.startswith("| cls 1 | ") and "GFLOP/s (" in line)
    assert f"{b['gflop_per_image']:.2f}" in work and f"{b['matmul_gflops']['fp32']:.0f} GFLOP/s" in work
    assert text.startswith("# Benchmarks\n\n## Models\n\nkept\n") and text.endswith("## Service\n\nalso kept\n")
    assert "`s2amnet bench --weights" in text.split("## Backends")[1]
    bad = subprocess.run([sys.executable, "-m", "app.cli", "bench", "--weights", str(folder), "--no-http",
                          "--backends", "onnxruntime,tensorrt"], cwd=ROOT, env=process_env(PYTHONPATH=str(ROOT)),
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "--backends: unknown tensorrt" in bad.stderr


def test_the_machine_line_names_the_cpus_vector_units():
    from app.commands.bench_report import vector_units

    assert vector_units({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}) == "AVX-512 + BF16 + AMX"
    assert vector_units({"avx2", "avx512f"}) == "AVX-512"
    assert vector_units({"avx2", "fma"}) == "AVX2"
    assert vector_units(set()) == "unknown"
    from app.commands.bench_report import machine_line

    line = machine_line("s2amnet bench", 0.0, {"cpu": "AMD EPYC", "cores": 2, "vector": "AVX-512 + BF16",
                                               "kernels": "AVX2", "torch": "2.13.0", "torch_threads": 2})
    assert "(2 cores, AVX-512 + BF16, torch's kernels limited to AVX2)" in line
    assert "limited" not in machine_line("s2amnet bench", 0.0, {"cpu": "x", "cores": 2, "vector": "AVX-512",
                                                                "kernels": "AVX512", "torch": "2", "torch_threads": 2})


def test_the_machine_record_names_the_instruction_set_torchs_kernels_use():
    """ATEN_CPU_CAPABILITY=avx2 (what an AVX2 machine would run) shows in the record of a run."""
    code = "import json; from app.commands.bench_report import machine; print(json.dumps(machine('cpu')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env=process_env(PYTHONPATH=str(ROOT), ATEN_CPU_CAPABILITY="avx2"))
    m = json.loads(out.stdout)
    assert m["kernels"] == "AVX2"
