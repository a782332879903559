"""Container health check: exit 0 if the URL answers 2xx within 5 seconds, else 1.

    python healthcheck.py [URL]    (default: $AEGIS_HEALTH_URL, else http://127.0.0.1:$AEGIS_PORT/ready)

The API answers /ready with 200 once its model is loaded (503 before); the chat UI answers / once Gradio is up.
Proxy variables are ignored: the check is always on the container's own loopback.
"""

import os
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("AEGIS_PORT", "8000")
    url = sys.argv[1] if len(sys.argv) > 1 else os.environ.get("AEGIS_HEALTH_URL", f"http://127.0.0.1:{port}/ready")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=5) as r:
            ok = 200 <= r.status < 300
    except Exception as e:  # noqa: BLE001 - any failure is "unhealthy"
        print(f"{url}: {e}")
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
