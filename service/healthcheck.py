"""The container image's HEALTHCHECK: GET /healthz where `serve` listens (HOST, PORT); exit 0 if it answers 2xx.

`python -m service.healthcheck`. The image has no curl, and a fixed http://127.0.0.1 missed a gateway told to
listen on IPv6 (HOST=::): asyncio binds `::` IPv6-only, so the container was reported unhealthy while it served.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from collections.abc import Mapping

PROBE_TIMEOUT_SECONDS = (
    2.0  # under the HEALTHCHECK's --timeout, so a hung probe fails rather than being killed
)
# A wildcard bind is reached over the loopback address of its family; any other HOST is reached as given.
_WILDCARD_PROBES = {"0.0.0.0": "127.0.0.1", "::": "::1"}  # noqa: S104 - addresses to map, not binds


def healthz_url(env: Mapping[str, str]) -> str:
    """Return the /healthz URL of a gateway started with the HOST and PORT in `env` (as settings read them)."""
    host = env.get("HOST", "").strip() or "127.0.0.1"
    port = env.get("PORT", "").strip() or "8080"
    host = _WILDCARD_PROBES.get(host, host)
    authority = f"[{host}]" if ":" in host else host
    return f"http://{authority}:{port}/healthz"


def main() -> int:
    """Probe /healthz once; return 0 when it answers 2xx, else 1 with the reason on stderr."""
    url = healthz_url(os.environ)
    # HTTP(S)_PROXY in the container's environment must not send a probe of this container elsewhere.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=PROBE_TIMEOUT_SECONDS):  # raises on a non-2xx answer
            return 0
    except (OSError, ValueError) as exc:
        print(f"healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
