"""``python -m danlu``: the ``danlu`` command line."""

from danlu.cli import main

raise SystemExit(main())
