"""Listeners bind before the network is up: the gate's unit does not wait for
network-online.target, so an address networkd has not configured yet must not stop it."""

from __future__ import annotations

import asyncio
import socket

import pytest
from portcullis import metrics
from portcullis.addresses import bind_before_address_is_up
from portcullis.config import HostPort

NOT_HERE_V4 = "192.0.2.1"      # TEST-NET-1: on no interface of this host
NOT_HERE_V6 = "2001:db8::1"    # documentation prefix


def test_without_freebind_an_absent_address_is_refused():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(OSError):
        sock.bind((NOT_HERE_V4, 0))


def test_an_ipv4_listener_binds_an_address_not_up_yet():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        bind_before_address_is_up(sock)
        sock.bind((NOT_HERE_V4, 0))
        sock.listen()


def test_an_ipv6_listener_binds_an_address_not_up_yet():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 here")
    try:
        sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:
        pytest.skip("no IPv6 here")
    with sock:
        bind_before_address_is_up(sock)
        sock.bind((NOT_HERE_V6, 0))
        sock.listen()


def test_the_metrics_endpoint_starts_on_an_address_not_up_yet():
    async def start() -> None:
        registry = metrics.Registry()

        async def healthy() -> str:
            return ""

        await registry.serve(HostPort(NOT_HERE_V4, 0), healthy)
        registry.server.close()
        await registry.server.wait_closed()

    asyncio.run(start())
