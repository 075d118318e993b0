"""The `evalsvc` command: `evalsvc serve` runs the service."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from evalsvc import config


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per operation."""
    parser = argparse.ArgumentParser(prog="evalsvc", description="Run LLM evaluations as a gRPC service.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the gRPC service until SIGTERM/SIGINT")
    config.add_flags(serve)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script."""
    args = build_parser().parse_args(argv)
    settings = config.from_args(args)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "serve":
        from evalsvc.server import serve

        asyncio.run(serve(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
