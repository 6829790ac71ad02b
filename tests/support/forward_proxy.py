"""A recording HTTP forward proxy on loopback: what an egress proxy sees of the gateway's outbound calls."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.servers import ServedApp

# Hop-by-hop headers (RFC 9110 section 7.6.1) and the proxy's own: never forwarded either way.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)


@dataclass(frozen=True)
class ProxiedRequest:
    """One request the proxy forwarded: the target host, path and the Proxy-Authorization it carried."""

    method: str
    host: str
    path: str
    proxy_authorization: str | None


@dataclass
class ForwardProxy:
    """A running proxy: its URL and every request it forwarded so far."""

    url: str
    seen: list[ProxiedRequest] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def requests(self) -> list[ProxiedRequest]:
        """Return a copy of the forwarded requests (the proxy runs in another thread)."""
        with self.lock:
            return list(self.seen)


def _proxy_app(proxy: ForwardProxy) -> Starlette:
    async def forward(request: Request) -> Response:
        # An absolute-form request line (`GET http://host/path`): uvicorn keeps the path, Host names the target.
        host = request.headers["host"]
        path = request.url.path
        with proxy.lock:
            proxy.seen.append(
                ProxiedRequest(request.method, host, path, request.headers.get("proxy-authorization"))
            )
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP_BY_HOP}
        async with httpx.AsyncClient(trust_env=False) as client:
            answer = await client.request(
                request.method,
                f"http://{host}{path}",
                params=request.url.query,
                headers=headers,
                content=await request.body(),
            )
        kept = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_BY_HOP | {"content-length"}}
        return Response(answer.content, status_code=answer.status_code, headers=kept)

    methods = ["GET", "POST", "DELETE", "PATCH", "PUT"]
    return Starlette(routes=[Route("/{path:path}", forward, methods=methods)])


@contextlib.contextmanager
def forward_proxy() -> Iterator[ForwardProxy]:
    """Run a recording forward proxy for plain-http targets on loopback for the block."""
    proxy = ForwardProxy(url="")
    served = ServedApp(_proxy_app(proxy), ws="none").start()
    proxy.url = served.url
    try:
        yield proxy
    finally:
        served.stop()
