#!/usr/bin/env python3
"""Memory per tracked client in the fleet's store (Valkey/Redis), for README's sizing.

Starts a private redis-server, has one gate process's store (policy/fleet.py) write what
clients leave behind, and reads the server's used_memory after each kind:

  harvest   a client with dha.ban_after invalid recipients in the window (the most a
            client's event set holds before its ban), and its /24 prefix's events
  ban       a ban
  pregreet  a pre-greet pass

Usage: bench/fleet_memory.py [--clients N]   (`make bench-fleet-memory`)
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from portcullis import config
from portcullis.policy import reputation

from tests.support.redis_server import RedisServer


def used_memory(server: RedisServer) -> int:
    info = server.cli("INFO", "memory", admin=True)
    return int(next(line.split(":")[1] for line in info.splitlines()
                    if line.startswith("used_memory:")))


async def fill(server: RedisServer, workdir: Path, clients: int) -> list[tuple[str, int]]:
    settings = config.loads(yaml.safe_dump({
        "hostname": "mx.example.test", "relay_domains": ["example.test"],
        "backend": {"servers": ["127.0.0.1:2525"]}, "state_dir": str(workdir / "state"),
        "limits": {"max_tracked_clients": clients * 2},
        "reputation": server.settings(timeout=5)}), "bench.yaml")
    store = reputation.open_store(settings)
    store.start()
    while not store.shared:
        await asyncio.sleep(0.05)
    addresses = [f"10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}" for n in range(clients)]
    ban_after = settings.dha.ban_after
    now = time.time()

    async def settled() -> int:
        while store.unsent:
            await asyncio.sleep(0.05)
        return used_memory(server)

    def harvest(address: str) -> None:
        for n in range(ban_after):
            store.add_event(address, now + n / 1000)
            store.add_event(address.rpartition(".")[0] + ".0/24", now + n / 1000)

    figures = [("empty", await settled())]
    for kind, write in (("harvest", harvest),
                        ("ban", lambda address: store.ban(address, now + 3600, "DHA_BAN")),
                        ("pregreet", lambda address: store.note_pregreet(address, True,
                                                                         now + 86400))):
        for start in range(0, clients, 1000):  # within the store's queue
            for address in addresses[start:start + 1000]:
                write(address)
            await settled()
        figures.append((kind, await settled()))
    dropped = store.take_counts().get("dropped", 0)
    await store.aclose()
    if dropped:
        raise SystemExit(f"the store's queue dropped {dropped} writes: figures not valid")
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, \
            RedisServer(Path(directory) / "redis") as server:
        figures = asyncio.run(fill(server, Path(directory), args.clients))
    print(f"fleet store memory, {args.clients} clients (redis-server used_memory):")
    for (_, before), (kind, after) in itertools.pairwise(figures):
        print(f"  {kind:<9} {(after - before) / args.clients:8.0f} bytes per client")
    total = figures[-1][1] - figures[0][1]
    print(f"  all three {total / args.clients:8.0f} bytes per client "
          f"({total / 2**20:.1f} MiB for {args.clients})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
