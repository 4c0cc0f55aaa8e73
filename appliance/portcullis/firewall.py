"""The client of the ban helper: put an address in the nftables ban set, take it out,
list the set.

The SMTP worker holds no CAP_NET_ADMIN. It connects to the helper's Unix socket
(`ban_socket`), sends one line `ban ADDRESS SECONDS` and reads one status line (see
banhelper.py). Everything is asynchronous and bounded by a short timeout, and a
failure never reaches mail flow: it is logged and counted in `failed`. The gate
refuses banned clients itself anyway; the set only moves the refusal into the kernel.
The operator's commands (operator.py) also send `unban ADDRESS` and `list`, and get a
BanHelperError for any failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import re

log = logging.getLogger("portcullis.firewall")

DEFAULT_TIMEOUT = 2.0  # seconds for connect, request and answer together
MAX_PENDING = 256  # requests in flight; beyond this, new ones are dropped and counted
MAX_ANSWER = 512  # bytes of each line of the helper's answer
LISTING = re.compile(r"OK listing (\d+)")  # the status line of `list`, then that many lines


class BanHelperError(Exception):
    """The helper could not be reached, did not answer in time, or refused."""


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
            status = (await self.ask(f"ban {address} {int(seconds)}"))[0]
        except BanHelperError as e:
            return self._failure(address, seconds, str(e))
        self.sent += 1
        log.debug("ban %s for %ss: %s", address, seconds, status)
        return True

    async def unban(self, address: str) -> str:
        """Take the address out of the set; its status line, or BanHelperError."""
        return (await self.ask(f"unban {address}"))[0]

    async def elements(self) -> dict[str, int | None]:
        """The addresses in the ban sets and the seconds each has left (None: no
        timeout), or BanHelperError."""
        _, *lines = await self.ask("list")
        return {address: None if left == "-" else int(left)
                for address, left in (line.split(" ") for line in lines)}

    async def ask(self, request: str) -> list[str]:
        """Send one request line; return the answer's lines (the OK status line, then the
        listing's), or raise BanHelperError."""
        try:
            async with asyncio.timeout(self.timeout):
                lines = await self._exchange(request + "\n")
        except TimeoutError:
            raise BanHelperError(f"the ban helper at {self.socket_path} did not answer "
                                 f"within {self.timeout}s") from None
        except (OSError, ValueError, asyncio.IncompleteReadError) as e:
            reason = getattr(e, "strerror", None) or e
            raise BanHelperError(f"cannot reach the ban helper at {self.socket_path}: "
                                 f"{reason}") from None
        if not lines[0].startswith("OK"):
            raise BanHelperError(f"the ban helper refused: {lines[0].removeprefix('ERR ')}")
        return lines

    def request_ban(self, address: str, seconds: int) -> None:
        """Start ban() without waiting for it (DhaEngine's on_ban). Needs a running loop."""
        self._start(self.ban(address, seconds), address, seconds)

    def request_unban(self, network: str) -> None:
        """Take every address inside network out of the sets, without waiting (a ban
        another appliance of a fleet lifted). Needs a running loop."""
        self._start(self._unban_inside(network), network, 0)

    async def _unban_inside(self, network: str) -> None:
        lifted = ipaddress.ip_network(network)
        try:
            for address in await self.elements():
                if ipaddress.ip_address(address) in lifted:
                    await self.unban(address)
        except BanHelperError as e:
            self.failed += 1
            log.warning("could not lift the ban on %s: %s", network, e)

    def _start(self, request, address: str, seconds: int) -> None:
        if len(self._pending) >= self.max_pending:
            request.close()
            self._failure(address, seconds, f"{self.max_pending} requests already pending")
            return
        try:
            task = asyncio.get_running_loop().create_task(request)
        except RuntimeError:
            request.close()
            self._failure(address, seconds, "no running event loop")
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def close(self) -> None:
        """Wait for pending requests (each is bounded by the timeout)."""
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)

    async def _exchange(self, request: str) -> list[str]:
        reader, writer = await asyncio.open_unix_connection(self.socket_path,
                                                            limit=MAX_ANSWER)

        async def line() -> str:
            data = await reader.readline()
            if not data.endswith(b"\n"):
                raise ConnectionError("the answer was cut short")
            return data.decode("ascii", "replace").strip()

        try:
            writer.write(request.encode("ascii"))
            await writer.drain()
            status = await line()
            listing = LISTING.fullmatch(status)
            return [status, *[await line() for _ in range(int(listing[1]) if listing else 0)]]
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def _failure(self, address: str, seconds: int, why: str) -> bool:
        self.failed += 1
        log.warning("could not ban %s for %ss: %s", address, seconds, why)
        return False
