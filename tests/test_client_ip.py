"""Client IP resolution behind trusted proxies: a table of cases and a hypothesis property."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.client_ip import client_block, client_ip, parse_ip
from service.settings import IPNetwork

TRUSTED: tuple[IPNetwork, ...] = (
    ipaddress.ip_network("10.0.0.0/8"),
    ipaddress.ip_network("fd00::/8"),
    ipaddress.ip_network("192.0.2.1/32"),
)


def scope(peer: str | None, *xff: str) -> dict[str, Any]:
    """Build an ASGI HTTP scope with a socket peer and X-Forwarded-For header lines."""
    headers = [(b"x-forwarded-for", value.encode()) for value in xff]
    headers.append((b"host", b"gateway.example"))
    return {"type": "http", "client": (peer, 51234) if peer else None, "headers": headers}


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        # Untrusted peer: headers are ignored, however convincing.
        ("203.0.113.9", (), "203.0.113.9"),
        ("203.0.113.9", ("198.51.100.1",), "203.0.113.9"),
        ("203.0.113.9", ("10.0.0.5",), "203.0.113.9"),
        # Trusted peer: right-most untrusted entry.
        ("10.0.0.1", ("198.51.100.1",), "198.51.100.1"),
        ("10.0.0.1", ("6.6.6.6, 198.51.100.1",), "198.51.100.1"),  # a spoofed left part is skipped
        ("10.0.0.1", ("6.6.6.6, 198.51.100.1, 10.0.0.7, 192.0.2.1",), "198.51.100.1"),
        ("10.0.0.1", ("6.6.6.6", "198.51.100.1, 10.0.0.7"), "198.51.100.1"),  # several header lines join
        ("10.0.0.1", (), "10.0.0.1"),  # no header: the proxy itself
        ("10.0.0.1", ("10.0.0.9, 10.0.0.8",), "10.0.0.9"),  # all trusted: the left-most hop
        # Malformed entries stop the walk at the last trusted hop.
        ("10.0.0.1", ("198.51.100.1, unknown",), "10.0.0.1"),
        ("10.0.0.1", ("198.51.100.1, not-an-ip, 10.0.0.3",), "10.0.0.3"),
        ("10.0.0.1", ("198.51.100.1,, 10.0.0.3",), "10.0.0.3"),
        # Ports, brackets and IPv4-mapped IPv6 are normalised.
        ("10.0.0.1", ("198.51.100.1:4711",), "198.51.100.1"),
        ("10.0.0.1", ("[2001:db8::1]:443",), "2001:db8::1"),
        ("fd00::1", ("2001:DB8:0:0::5",), "2001:db8::5"),
        ("::ffff:10.0.0.1", ("198.51.100.2",), "198.51.100.2"),
        ("::ffff:203.0.113.9", ("198.51.100.2",), "203.0.113.9"),
        # No socket peer (e.g. a unix socket) and non-IP peers.
        (None, ("198.51.100.1",), "unknown"),
        ("testclient", ("198.51.100.1",), "testclient"),
    ],
)
def test_only_trusted_peers_are_believed_and_the_right_most_untrusted_hop_is_the_client(
    peer: str | None, xff: tuple[str, ...], expected: str
) -> None:
    assert client_ip(scope(peer, *xff), TRUSTED) == expected


def test_without_trusted_proxies_the_peer_is_the_client() -> None:
    assert client_ip(scope("10.0.0.1", "198.51.100.1"), ()) == "10.0.0.1"


@pytest.mark.parametrize(
    ("client", "prefix", "expected"),
    [
        ("203.0.113.9", 64, "203.0.113.9"),  # IPv4: the address itself, whatever the IPv6 prefix
        ("2001:db8:1:2:3:4:5:6", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2::", 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:3:4:5:6", 48, "2001:db8:1::/48"),
        ("2001:db8:1:2:3:4:5:6", 128, "2001:db8:1:2:3:4:5:6/128"),
        ("::ffff:203.0.113.9", 64, "203.0.113.9"),  # IPv4-mapped: the IPv4 client it is
        ("fe80::1%eth0", 64, "fe80::/64"),
        ("testclient", 64, "testclient"),  # not an IP socket: left as it is
    ],
)
def test_client_block_is_the_ipv4_address_or_the_ipv6_network(
    client: str, prefix: int, expected: str
) -> None:
    assert client_block(client, prefix) == expected


def test_parse_ip_rejects_garbage() -> None:
    assert parse_ip("") is None and parse_ip("[::1") is None and parse_ip("1.2.3.4.5") is None
    assert str(parse_ip(" 1.2.3.4 ")) == "1.2.3.4"


trusted_ips = st.sampled_from(["10.0.0.1", "10.1.2.3", "192.0.2.1", "fd00::1", "fd12::34"])
untrusted_ips = st.sampled_from(["198.51.100.1", "203.0.113.9", "2001:db8::1", "8.8.8.8", "192.0.2.2"])
garbage = st.sampled_from(["unknown", "", "x", "999.1.1.1", "_hidden", "[::1"])
entries = st.lists(st.one_of(trusted_ips, untrusted_ips, garbage, st.text(max_size=12)), max_size=8)


@given(peer=st.one_of(trusted_ips, untrusted_ips), xff=entries, split=st.integers(min_value=0, max_value=8))
def test_result_is_never_client_controlled_unless_every_hop_right_of_it_is_trusted(
    peer: str, xff: list[str], split: int
) -> None:
    cleaned = [entry.replace(",", "") for entry in xff]
    lines = [", ".join(cleaned[:split]), ", ".join(cleaned[split:])]
    result = client_ip(scope(peer, *[line for line in lines if line]), TRUSTED)
    joined = [e.strip() for line in lines if line for e in line.split(",")]

    def trusted(value: str) -> bool:
        address = parse_ip(value)
        return address is not None and any(address.version == n.version and address in n for n in TRUSTED)

    if result == str(parse_ip(peer)):
        return  # the socket peer is never client-controlled
    assert trusted(peer), "an untrusted peer's headers were believed"
    # The result came from the header: find its position and check every hop to its right.
    positions = [
        i for i, entry in enumerate(joined) if parse_ip(entry) is not None and str(parse_ip(entry)) == result
    ]
    assert positions, "the result is neither the peer nor a header entry"
    position = max(positions)
    assert all(trusted(entry) for entry in joined[position + 1 :])
