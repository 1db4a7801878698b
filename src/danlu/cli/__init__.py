"""The ``danlu`` command line: ``danlu compare`` (see ``danlu compare --help``)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Sequence

USAGE = """usage: danlu <command> [options]

commands:
  compare    train small real models with several optimizers side by side
             (danlu compare --help)
"""


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0 if args else 2
    if args[0] == "--version":
        import danlu

        print(f"danlu {danlu.__version__}")
        return 0
    if args[0] == "compare":
        try:
            from danlu.cli.compare import run

            return run(args[1:])
        except KeyboardInterrupt:  # before or after run() catches it itself
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            print("danlu compare: interrupted; nothing written", file=sys.stderr)
            return 130
    print(f"danlu: error: unknown command {args[0]!r} (try: danlu compare --help)", file=sys.stderr)
    return 2
