"""The client IP of a request: the socket peer, or the proxy-reported address when the peer is trusted.

`X-Forwarded-For` is written by the client first and each proxy appends the address it received the
request from, so only the entries a trusted proxy appended can be believed. The walk therefore starts
at the socket peer and moves left through the header while each hop is a trusted proxy; the first hop
that is not trusted is the client. Anything further left was written by that client and is ignored.

- Peer not in `TRUSTED_PROXIES`: the peer, whatever the headers say (spoofing from outside is ignored).
- Every `X-Forwarded-For` header line is joined, in order, into one list (RFC 9110 field combination).
- An entry that is not an IP address (`unknown`, garbage, an empty element) stops the walk: the result is
  the last trusted hop seen, because nothing to the left of a malformed entry can be attributed.
- `host:port`, `[v6]:port` and IPv4-mapped IPv6 forms are normalised to the bare address.

Limits key a client by what it controls (`client_block`): an IPv4 address, or the IPv6 network of
`RATE_LIMIT_IPV6_PREFIX` bits (default /64) around an IPv6 address, since one IPv6 client is routinely
given a whole /64 and may use any address in it. Logs and audit lines keep the full address.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from typing import Any

from service.settings import IPNetwork

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

UNKNOWN_CLIENT = "unknown"
# The smallest IPv6 assignment an end site gets (RFC 6177): every address in it may be the same client.
DEFAULT_IPV6_PREFIX = 64
_XFF = b"x-forwarded-for"


# Bounded: forwarding headers are client-controlled. Peers repeat (keep-alive, proxies), and parsing one
# with ipaddress costs ~10 us, paid by every request for its access log and auth-failure guard.
@functools.lru_cache(maxsize=4096)
def parse_ip(value: str) -> IPAddress | None:
    """Parse one address as found in a socket peer or a forwarding header; None when it is not an IP."""
    text = value.strip()
    if not text:
        return None
    if text.startswith("["):  # "[2001:db8::1]:443"
        end = text.find("]")
        if end == -1:
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # "203.0.113.9:51234"
        text = text.split(":", 1)[0]
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@functools.lru_cache(maxsize=4096)
def client_block(client: str, ipv6_prefix: int = DEFAULT_IPV6_PREFIX) -> str:
    """Return the address block a client controls: an IPv4 address itself, an IPv6 one's /`ipv6_prefix`."""
    address = parse_ip(client)
    if address is None:
        return client
    if address.version == 4:
        return str(address)  # an IPv4-mapped IPv6 address is that IPv4 client
    return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))


def is_trusted(address: IPAddress, trusted_proxies: Iterable[IPNetwork]) -> bool:
    """Tell whether `address` belongs to one of the trusted proxy networks."""
    return any(address.version == net.version and address in net for net in trusted_proxies)


def forwarded_for(scope: Any) -> list[str]:
    """Return the `X-Forwarded-For` entries of an ASGI scope, every header line joined, left to right."""
    entries: list[str] = []
    for name, value in scope.get("headers") or ():
        if name.lower() == _XFF:
            entries.extend(item.strip() for item in value.decode("latin-1").split(","))
    return entries


def resolve(peer: str | None, entries: Sequence[str], trusted_proxies: Sequence[IPNetwork]) -> str:
    """Return the client address given the socket peer and the `X-Forwarded-For` entries."""
    if peer is None:
        return UNKNOWN_CLIENT
    current = parse_ip(peer)
    if current is None:
        return peer  # not an IP socket (e.g. a test client name): nothing to trust
    if not trusted_proxies or not is_trusted(current, trusted_proxies):
        return str(current)
    for entry in reversed(entries):
        hop = parse_ip(entry)
        if hop is None:
            break  # a malformed hop: nothing to its left can be attributed, keep the last trusted one
        current = hop
        if not is_trusted(hop, trusted_proxies):
            break
    return str(current)


def client_ip(scope: Any, trusted_proxies: Sequence[IPNetwork]) -> str:
    """Return the client IP of an ASGI connection scope, honouring `X-Forwarded-For` only from trusted proxies."""
    client = scope.get("client")
    peer = str(client[0]) if client else None
    if peer is None or not trusted_proxies:
        return resolve(peer, (), trusted_proxies)
    return resolve(peer, forwarded_for(scope), trusted_proxies)
