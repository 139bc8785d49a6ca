"""Load run of the Redis mode: a few thousand requests leave Redis bounded and the API's RSS flat.

Measured and printed (run with -s to see the numbers): API RSS after warm-up / half-way / at the end,
Redis key count and used memory, what keys are left and with which TTL. S2AMNET_E2E_LOAD_REQUESTS raises
the number of requests (default 2000, sized for CI on 2 cores)."""

from __future__ import annotations

import asyncio
import os
import time

import httpx
import pytest
from support.harness import group_pending, key_report, redis_stack
from support.images import png

N = int(os.environ.get("S2AMNET_E2E_LOAD_REQUESTS", "2000"))
WARMUP = 200
CONCURRENCY = 64
IDEMPOTENT_EVERY = 4  # every 4th request carries an Idempotency-Key (stored in Redis with a TTL)
IDEMPOTENCY_TTL_S = 4.0
TRANSPORT_RETRIES: list[int] = []  # requests whose connection dropped and were sent again


async def _blast(url: str, start: int, count: int, bodies: list[bytes]) -> list[int]:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    statuses: list[int] = []
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as c:
        sem = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            headers = {"Idempotency-Key": f"load-{i}"} if i % IDEMPOTENT_EVERY == 0 else {}
            files = [("file", ("x.png", bodies[i % len(bodies)], "image/png"))]
            async with sem:
                try:
                    resp = await c.post("/classify", files=files, headers=headers)
                except httpx.TransportError:
                    # a connection dropped under 64-way load on a 2-core CI box (seen once in CI as a
                    # ReadError; likely cause, since fixed: uvicorn closed idle keep-alive connections
                    # after 5 s, the same time httpx keeps them, so a reuse could meet the close — the
                    # server now keeps them S2AMNET_KEEP_ALIVE_S = 75 s): retried once, like a client
                    # would, and counted (see the assertion)
                    TRANSPORT_RETRIES.append(i)
                    resp = await c.post("/classify", files=files, headers=headers)
            statuses.append(resp.status_code)

        await asyncio.gather(*(one(i) for i in range(start, start + count)))
    return statuses


@pytest.mark.slow
def test_load_run_leaves_redis_bounded_and_api_rss_flat(tmp_path, e2e_weights):
    bodies = [png(48, 40, seed=i) for i in range(64)]
    # batches of up to 32 with 20 ms to fill them: forwards have a high fixed cost on the CPU
    with redis_stack(tmp_path, e2e_weights, workers=1, models="cls", S2AMNET_MAX_QUEUE="1000",
                     S2AMNET_REQUEST_TIMEOUT_S="60", S2AMNET_MAX_BATCH_SIZE="32", S2AMNET_MAX_DELAY_MS="20",
                     S2AMNET_IDEMPOTENCY_TTL_S=str(IDEMPOTENCY_TTL_S)) as stack:
        r = stack.r()
        api = stack.api
        assert set(asyncio.run(_blast(api.url, 0, WARMUP, bodies))) == {200}
        rss = [api.rss_kib()]
        before = key_report(r)
        t0 = time.monotonic()
        done = WARMUP
        step = (N - WARMUP) // 4
        statuses: list[int] = []
        samples = []
        while done < N:
            count = min(step, N - done)
            statuses += asyncio.run(_blast(api.url, done, count, bodies))
            done += count
            rss.append(api.rss_kib())
            samples.append(key_report(r))
        elapsed = time.monotonic() - t0
        assert set(statuses) == {200}, {s: statuses.count(s) for s in set(statuses)}
        assert len(TRANSPORT_RETRIES) <= N // 100, TRANSPORT_RETRIES  # rare, never systematic
        after = key_report(r)

        # -- Redis: only the job stream lives without a TTL, and it is empty; the reply stream is
        # consumed as it is read; idempotency results and worker heartbeats carry TTLs.
        no_ttl = {k for k, v in after["keys"].items() if v["ttl"] == -1}
        assert no_ttl == {"s2amnet:jobs:cls"}, after["keys"]
        assert after["keys"]["s2amnet:jobs:cls"]["len"] == 0
        assert group_pending(r, "cls") == 0
        replies = [v for k, v in after["keys"].items() if k.startswith("s2amnet:replies:")]
        assert len(replies) <= 1 and all(v["len"] <= CONCURRENCY for v in replies), replies
        idem = [k for k in after["keys"] if k.startswith("s2amnet:idem:")]
        assert not [k for k in after["keys"] if k.startswith("s2amnet:idem-lock:")]
        assert 0 < len(idem) <= (N - WARMUP) // IDEMPOTENT_EVERY + WARMUP // IDEMPOTENT_EVERY
        max_dbsize = max(s["dbsize"] for s in samples)
        # after the idempotency TTL, the key count falls back to the fixed set (job stream, reply stream,
        # heartbeat): nothing grows with the number of requests
        time.sleep(IDEMPOTENCY_TTL_S + 0.5)
        settled = key_report(r)
        assert not [k for k in settled["keys"] if k.startswith("s2amnet:idem")], settled["keys"]
        assert settled["dbsize"] <= 3, settled["keys"]
        mem_growth = settled["used_memory"] - before["used_memory"]
        assert mem_growth < 4 * 2**20, (before["used_memory"], settled["used_memory"])

        # -- API RSS roughly flat: what the second half adds is small next to the process size
        growth_total = rss[-1] - rss[0]
        growth_second_half = rss[-1] - rss[len(rss) // 2]
        assert growth_second_half < 16 * 1024, rss  # < 16 MiB over the last half of the run
        assert growth_total < 48 * 1024, rss
        print(f"\nload test: {N} requests ({N - WARMUP} measured) in {elapsed:.1f} s "
              f"({(N - WARMUP) / elapsed:.0f} req/s, concurrency {CONCURRENCY}, 1 worker); "
              f"API RSS KiB {rss} (total growth {growth_total} KiB, last half {growth_second_half} KiB); "
              f"Redis keys after warm-up {before['dbsize']}, max during run {max_dbsize}, at the end "
              f"{after['dbsize']} ({len(idem)} idempotency keys with TTL), after the TTL "
              f"{settled['dbsize']}; "
              f"used_memory {before['used_memory']} -> {after['used_memory']} -> {settled['used_memory']} B")
