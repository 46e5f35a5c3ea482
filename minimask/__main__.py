"""The command line: ``python -m minimask <command>``."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m minimask",
        description="RetinaMask from scratch in NumPy, with hand-written backward passes.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("check", help="gradient-check every layer and compare the fast "
                                 "backends with the NumPy reference")
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "check":
        from minimask import selfcheck
        return selfcheck.main()
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
