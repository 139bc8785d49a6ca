"""Container health probe without curl: exit 0 when the URL answers 2xx, 1 otherwise.

Usage: python healthcheck.py [URL]
Default URL: http://127.0.0.1:${S2AMNET_PORT:-8000}/readyz (the API's readiness). A worker container
passes its metrics URL instead (http://127.0.0.1:${S2AMNET_METRICS_PORT:-9100}/metrics).
"""

import os
import sys
import urllib.error
import urllib.request


def main() -> int:
    url = (
        sys.argv[1]
        if len(sys.argv) > 1
        else (f"http://127.0.0.1:{os.environ.get('S2AMNET_PORT', '8000')}/readyz")
    )
    try:
        with urllib.request.urlopen(url, timeout=float(os.environ.get("HEALTHCHECK_TIMEOUT_S", "3"))) as r:
            return 0 if 200 <= r.status < 300 else 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"healthcheck {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
