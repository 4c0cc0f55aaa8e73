"""The gate's side of the ban feed: ask the ban helper to put an address in the
nftables ban set.

The SMTP worker holds no CAP_NET_ADMIN. It connects to the helper's Unix socket
(`ban_socket`), sends one line `ban ADDRESS SECONDS` and reads one status line (see
banhelper.py). Everything is asynchronous and bounded by a short timeout, and a
failure never reaches mail flow: it is logged and counted in `failed`. The gate
refuses banned clients itself anyway; the set only moves the refusal into the kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging

log = logging.getLogger("portcullis.firewall")

DEFAULT_TIMEOUT = 2.0  # seconds for connect, request and answer together
MAX_PENDING = 256  # requests in flight; beyond this, new ones are dropped and counted
MAX_ANSWER = 512  # bytes of the helper's status line


class BanClient:
    """Counters for metrics: `sent` (bans the helper confirmed), `failed` (unreachable,
    timed out, refused, or dropped because too many were pending)."""

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT,
                 max_pending: int = MAX_PENDING):
        self.socket_path = socket_path
        self.timeout = timeout
        self.max_pending = max_pending
        self.sent = 0
        self.failed = 0
        self._pending: set[asyncio.Task] = set()

    async def ban(self, address: str, seconds: int) -> bool:
        """Ask for the ban and wait for the answer. True when the helper confirmed it."""
        try:
            address = str(ipaddress.ip_address(address))
        except ValueError:
            return self._failure(address, seconds, "not an IP address")
        try:
            async with asyncio.timeout(self.timeout):
                status = await self._exchange(f"ban {address} {int(seconds)}\n")
        except TimeoutError:
            return self._failure(address, seconds, f"no answer within {self.timeout}s")
        except (OSError, ValueError, asyncio.IncompleteReadError) as e:
            return self._failure(address, seconds, f"ban helper at {self.socket_path}: {e}")
        if not status.startswith("OK"):
            return self._failure(address, seconds, status or "no answer")
        self.sent += 1
        log.debug("ban %s for %ss: %s", address, seconds, status)
        return True

    def request_ban(self, address: str, seconds: int) -> None:
        """Start ban() without waiting for it (DhaEngine's on_ban). Needs a running loop."""
        if len(self._pending) >= self.max_pending:
            self._failure(address, seconds, f"{self.max_pending} requests already pending")
            return
        try:
            task = asyncio.get_running_loop().create_task(self.ban(address, seconds))
        except RuntimeError:
            self._failure(address, seconds, "no running event loop")
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Wait for pending requests (each is bounded by the timeout)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def _exchange(self, request: str) -> str:
        reader, writer = await asyncio.open_unix_connection(self.socket_path,
                                                            limit=MAX_ANSWER)
        try:
            writer.write(request.encode("ascii"))
            await writer.drain()
            line = await reader.readline()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        return line.decode("ascii", "replace").strip()

    def _failure(self, address: str, seconds: int, why: str) -> bool:
        self.failed += 1
        log.warning("could not ban %s for %ss: %s", address, seconds, why)
        return False
