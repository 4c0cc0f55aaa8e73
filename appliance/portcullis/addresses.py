"""Client addresses: one canonical form, the client an address belongs to, prefixes, and
per-client rate buckets; and the box's own listening addresses, which may not be up yet."""

from __future__ import annotations

import functools
import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@functools.lru_cache(maxsize=4096)
def canonical(address: str) -> IPAddress:
    """The address, with IPv4-mapped IPv6 (::ffff:192.0.2.1) written as IPv4; remembered,
    since every connection and message asks for its client's."""
    ip = ipaddress.ip_address(address)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def prefix_of(ip: IPAddress, ipv4_bits: int, ipv6_bits: int) -> str:
    """The network an address belongs to for per-prefix limits, e.g. 192.0.2.0/24."""
    bits = ipv4_bits if ip.version == 4 else ipv6_bits
    return str(ipaddress.ip_network((ip, bits), strict=False))


@functools.lru_cache(maxsize=4096)
def prefix_of_text(address: str, ipv4_bits: int, ipv6_bits: int) -> str:
    """prefix_of for an address in text, remembered: admission asks for every connection."""
    return prefix_of(canonical(address), ipv4_bits, ipv6_bits)


@functools.lru_cache(maxsize=4096)
def client_of(address: str, ipv6_bits: int) -> str:
    """The client an address stands for: an IPv4 address, or the IPv6 network of
    `ipv6_bits` (limits.ipv6_client_prefix) around it, since one IPv6 host usually has a
    whole /64 to take addresses from. Keys every per-client table."""
    ip = canonical(address)
    if ip.version == 4 or ipv6_bits == 128:
        return str(ip)
    return str(ipaddress.ip_network((ip, ipv6_bits), strict=False))


@functools.lru_cache(maxsize=4096)
def is_public(address: str) -> bool:
    """Whether an address is globally routable (neither private, loopback nor reserved)."""
    return canonical(address).is_global


# <linux/in.h> and <linux/in6.h>; Python's socket module names neither.
IP_FREEBIND = 15
IPV6_FREEBIND = 78


def bind_before_address_is_up(sock: socket.socket) -> None:
    """Let `sock` bind an address no interface holds yet (IP_FREEBIND, as systemd's
    NETWORK_ONLINE advice has it): the gate starts without waiting for the network to be
    configured, and a listener on a specific address takes connections once it is."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, IPV6_FREEBIND, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (an IPv6 one takes IPv6 only), allowed to bind an
    address that is not up yet; the caller listens on it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        bind_before_address_is_up(sock)  # the gate's unit does not wait for network-online
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class TokenBucket:
    """`rate` tokens a second, holding at most `burst`; each allowed event takes one."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    def is_full(self, now: float) -> bool:
        return self.tokens + (now - self.stamp) * self.rate >= self.burst
