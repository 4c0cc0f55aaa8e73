"""The `portcullis` command: check-config, serve, the ban helper, the operator's commands
(show-config, status, bans), and the internal worker command."""

from __future__ import annotations

import argparse
import sys

from . import __version__
from . import config as configuration
from .config import ConfigError

# Each command imports what only it needs (asyncio, the gate, the worker, the operator's
# tools): every boot runs check-config twice before the gate starts, and under an
# emulated CPU each module costs.


def _event_loop_policy() -> None:
    import asyncio
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def _setup_logging(level: str, name: str) -> None:
    from .logs import setup
    setup(level, name)  # JSON lines, to journald under systemd, else stderr


# check-config, serve, a worker's start and a reload (gate.py, worker.py) all validate
# through configuration.load(): the schema, the rules across keys, and what the keys name.

def check_config(args: argparse.Namespace) -> int:
    config = configuration.load(args.config)
    print(f"{args.config}: OK ({len(config.relay_domains)} relay domains, "
          f"{len(config.backend.servers)} backend servers, {config.workers} workers)")
    return 0


def serve(args: argparse.Namespace) -> int:
    import asyncio
    import gc

    from .gate import Gate

    config = configuration.load(args.config)
    _setup_logging(config.log_level, "gate")
    _event_loop_policy()

    async def main() -> None:
        gc.freeze()  # what is loaded now lives as long as the process: never scan it
        await Gate(config, args.config).run()

    asyncio.run(main())
    return 0


def worker(args: argparse.Namespace) -> int:
    import asyncio
    import gc
    import socket

    from .worker import WorkerProcess

    config = configuration.load(args.config)
    _setup_logging(config.log_level, f"worker-{args.number}")
    _event_loop_policy()
    control = socket.socket(fileno=args.control_fd)

    async def main() -> None:
        gc.freeze()  # what is loaded now lives as long as the process: never scan it
        await WorkerProcess(config, args.config, control).run()

    asyncio.run(main())
    return 0


def ban_helper(args: argparse.Namespace) -> int:
    from .banhelper import main as helper_main
    return helper_main(["--config", args.config])


# The operator's commands (operator.py), on a running appliance: postconf, postqueue.

def show_config(args: argparse.Namespace) -> int:
    from . import operator
    print(operator.show_config(configuration.load(args.config), args.changed_only), end="")
    return 0


def _operate(args: argparse.Namespace, command: str, *arguments) -> int:
    from . import operator
    return operator.run(getattr(operator, command), configuration.load(args.config, io_checks=False),
                        *arguments)


def status(args: argparse.Namespace) -> int:
    return _operate(args, "status")


def bans_list(args: argparse.Namespace) -> int:
    return _operate(args, "bans_list")


def bans_add(args: argparse.Namespace) -> int:
    return _operate(args, "bans_add", args.address, args.seconds)


def bans_remove(args: argparse.Namespace) -> int:
    return _operate(args, "bans_remove", args.address)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="portcullis", description="Before-queue SMTP gate")
    parser.add_argument("--version", action="version", version=f"portcullis {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, function, help_text: str, group=commands) -> argparse.ArgumentParser:
        sub = group.add_parser(name, help=help_text)
        sub.add_argument("-c", "--config", default=configuration.DEFAULT_PATH,
                         help=f"configuration file (default {configuration.DEFAULT_PATH})")
        sub.set_defaults(function=function)
        return sub

    command("check-config", check_config, "validate the configuration file and exit")
    command("serve", serve, "run the gate")
    command("ban-helper", ban_helper, "run the privileged helper that feeds the nftables ban sets")
    sub = command("show-config", show_config, "print the effective configuration as YAML")
    sub.add_argument("-n", dest="changed_only", action="store_true",
                     help="only the keys the file sets to other than the default")
    command("status", status, "report on the running gate: listeners, workers, connections, "
                              "backend, store")
    actions = commands.add_parser("bans", help="list, add or remove bans").add_subparsers(
        dest="action", required=True)
    command("list", bans_list, "the bans in force, and whether the kernel set holds each",
            actions)
    sub = command("add", bans_add, "ban an address in the store and the kernel set", actions)
    sub.add_argument("address")
    sub.add_argument("seconds", type=int, nargs="?", help="default: reputation.ban_ttl")
    sub = command("remove", bans_remove, "lift the ban on an address or a prefix", actions)
    sub.add_argument("address", metavar="address|prefix")
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
