"""Fault test of the Redis mode: a worker SIGKILLed mid-run loses nothing, with the shipped visibility
timeout: its jobs are taken over as soon as its heartbeat keys lapse, inside the requests' deadlines."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import httpx
import pytest
from support.answers import Reference, assert_same_answer, size_for
from support.harness import GROUP, JOBS, consumer_of, group_pending, redis_stack
from support.images import png
from support.metrics import metric

from app.worker import stream_consumer

N = 200
VISIBILITY_S = 30.0  # the default: a killed worker's jobs must not wait for it
REQUEST_TIMEOUT_S = 25.0  # below the visibility timeout, as the defaults are (10 s against 30 s)


@pytest.mark.parametrize("streams", [1, 2])
def test_sigkill_one_of_two_workers_mid_run_every_request_answered(tmp_path, e2e_weights, streams: int):
    """``streams``: inference streams per worker (each a consumer of its own: a killed worker leaves jobs
    pending under every one of them)."""
    bodies = [png(*size_for(i), seed=i) for i in range(N)]
    ref = Reference(e2e_weights, "cls")
    want = ref.answers(bodies)

    env = dict(S2AMNET_MAX_QUEUE="1000", S2AMNET_REQUEST_TIMEOUT_S=str(REQUEST_TIMEOUT_S), S2AMNET_MAX_BATCH_SIZE="8",
               S2AMNET_MAX_DELAY_MS="5")
    # every forward sleeps 50 ms first, so that the run lasts long enough to kill a worker in it
    with redis_stack(tmp_path, e2e_weights, workers=2, models="cls", visibility_s=VISIBILITY_S,
                     worker_env={"S2AMNET_TEST_INFER_DELAY_S": "0.05", "S2AMNET_CPU_STREAMS": str(streams),
                                 "S2AMNET_TORCH_THREADS": str(streams)}, **env) as stack:
        r = stack.r()
        victim, survivor = stack.workers
        victim_name = consumer_of(r, victim.pid)
        victim_names = {stream_consumer(victim_name, i) for i in range(streams)}
        done = 0
        killed: dict = {}

        def held_by_victim() -> int:
            return sum(int(c["pending"]) for c in r.xpending(JOBS.format("cls"), GROUP)["consumers"]
                       if _s(c["name"]) in victim_names)

        def killer() -> None:
            # Freeze the victim (SIGSTOP) before counting what it holds, so that the count cannot go
            # stale between reading it and the kill (a batch acked in between would leave nothing to
            # redeliver); a command already on the wire gets 50 ms to land. Holding nothing: thaw, retry.
            end = time.monotonic() + 60
            while time.monotonic() < end:
                if done >= 10 and held_by_victim() > 0:
                    victim.send(signal.SIGSTOP)
                    time.sleep(0.05)
                    held = held_by_victim()
                    if held > 0:
                        victim.send(signal.SIGKILL)
                        killed.update(pending=held, done=done, at=time.monotonic())
                        return
                    victim.send(signal.SIGCONT)
                time.sleep(0.002)

        async def run() -> list[httpx.Response]:
            nonlocal done
            limits = httpx.Limits(max_connections=N, max_keepalive_connections=N)
            async with httpx.AsyncClient(base_url=stack.api.url, timeout=90, limits=limits) as c:
                async def one(i: int) -> httpx.Response:
                    nonlocal done
                    resp = await c.post("/classify", files=[("file", ("x.png", bodies[i], "image/png"))],
                                        data={"part_id": f"part-{i}"})
                    done += 1
                    return resp

                return await asyncio.gather(*(one(i) for i in range(N)))

        thread = threading.Thread(target=killer, daemon=True)
        thread.start()
        t0 = time.monotonic()
        responses = asyncio.run(run())
        elapsed = time.monotonic() - t0
        thread.join(5)

        assert killed, f"the victim never held a job while requests were running\n{stack.logs()}"
        assert victim.wait(10) == -signal.SIGKILL
        assert [resp.status_code for resp in responses] == [200] * N, \
            [resp.text for resp in responses if resp.status_code != 200][:3]
        for i, resp in enumerate(responses):
            got = resp.json()
            assert got["part_id"] == f"part-{i}"
            assert (got["image"]["width"], got["image"]["height"]) == size_for(i)
            assert_same_answer(got, want[i])

        # nothing left behind: every job acked (and deleted), nothing dead-lettered
        assert group_pending(r, "cls") == 0
        assert r.xlen(JOBS.format("cls")) == 0
        assert r.xlen("s2amnet:dead:cls") == 0
        assert r.xinfo_groups(JOBS.format("cls"))[0]["lag"] == 0  # defined (KEDA scales on it) and 0
        # the survivor took the victim's jobs over (its heartbeat gone, not after the visibility timeout)
        metrics = httpx.get(survivor.url, timeout=10).text
        redelivered = metric(metrics, "s2amnet_jobs_redelivered_total", model="cls")
        assert redelivered >= killed["pending"], (redelivered, killed)
        assert "whose worker is gone" in survivor.log() and "idle > " not in survivor.log()
        assert survivor.alive() and stack.api.alive()
        print(f"\nfault test: {N} requests in {elapsed:.2f} s, worker SIGKILLed after {killed['done']} "
              "answers "
              f"holding {killed['pending']} unacked jobs; survivor redelivered {redelivered:.0f}; "
              f"all {N} answers correct; group pending 0")


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else v
