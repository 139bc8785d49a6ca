"""Run the `s2amnet` command line (exactly what the console script runs: `app.cli.main`) for tests.

Fault injection for tests, and nothing else: when S2AMNET_TEST_INFER_DELAY_S is set, every
`Predictor.infer` call first sleeps that long, so that tests can hold a batch "in flight" (SIGTERM drain,
full queue, deadlines) with tiny models; S2AMNET_TEST_DECODE_DELAY_S does the same to the API's decoding of
each uploaded image (`app.pipeline.prepare`). Usage: python tests/support/launch.py serve --port ... (or worker).
"""

from __future__ import annotations

import os
import sys
import time


def _slow_down(delay: float) -> None:
    from model.predictor import Predictor

    original = Predictor.infer

    def infer(self, arrays):
        time.sleep(delay)
        return original(self, arrays)

    Predictor.infer = infer


def _slow_decoding(delay: float) -> None:
    import app.pipeline

    original = app.pipeline.prepare

    def prepare(*args, **kwargs):
        time.sleep(delay)
        return original(*args, **kwargs)

    app.pipeline.prepare = prepare


if __name__ == "__main__":
    delay = float(os.environ.get("S2AMNET_TEST_INFER_DELAY_S") or 0)
    if delay > 0:
        _slow_down(delay)
    decode_delay = float(os.environ.get("S2AMNET_TEST_DECODE_DELAY_S") or 0)
    if decode_delay > 0:
        _slow_decoding(decode_delay)
    from app.cli import main

    sys.exit(main(sys.argv[1:]))
