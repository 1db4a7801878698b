"""``python -m danlu``: the ``danlu`` command line."""

from danlu.cli import main

# guarded: ``danlu compare``'s worker processes are spawned and import this module again
if __name__ == "__main__":
    raise SystemExit(main())
