"""The `portcullis` command: check-config, serve, and the internal worker command."""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import sys

from . import __version__
from . import config as configuration
from .config import ConfigError


def _event_loop_policy() -> None:
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format=f"%(levelname)s {name}: %(name)s: %(message)s",
        stream=sys.stderr,
    )


# check-config, serve, a worker's start and a reload (gate.py, worker.py) all validate
# through configuration.load(): the schema, the rules across keys, and what the keys name.

def check_config(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    print(f"{args.config}: OK ({len(config.relay_domains)} relay domains, "
          f"{len(config.backend.servers)} backend servers, {config.workers} workers)")
    return 0


def serve(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    _setup_logging(config.log_level, "gate")
    _event_loop_policy()
    from .gate import Gate

    async def main() -> None:
        await Gate(config, args.config).run()

    asyncio.run(main())
    return 0


def worker(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    _setup_logging(config.log_level, f"worker-{args.number}")
    _event_loop_policy()
    from .worker import WorkerProcess

    control = socket.socket(fileno=args.control_fd)

    async def main() -> None:
        await WorkerProcess(config, args.config, control).run()

    asyncio.run(main())
    return 0


def ban_helper(args: argparse.Namespace) -> int:
    from .banhelper import main as helper_main
    return helper_main(["--config", args.config])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="portcullis", description="Before-queue SMTP gate")
    parser.add_argument("--version", action="version", version=f"portcullis {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, function, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("-c", "--config", default=configuration.DEFAULT_PATH,
                         help=f"configuration file (default {configuration.DEFAULT_PATH})")
        sub.set_defaults(function=function)
        return sub

    command("check-config", check_config, "validate the configuration file and exit")
    command("serve", serve, "run the gate")
    command("ban-helper", ban_helper, "run the privileged helper that feeds the nftables ban sets")
    sub = command("worker", worker, argparse.SUPPRESS)
    sub.add_argument("--control-fd", type=int, required=True)
    sub.add_argument("--number", type=int, default=0)

    args = parser.parse_args(argv)
    try:
        return args.function(args)
    except ConfigError as e:
        print(f"portcullis: configuration error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
