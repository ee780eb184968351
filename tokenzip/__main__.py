"""``python -m tokenzip``: the command line (see :mod:`tokenzip.cli`)."""

from .cli import main

raise SystemExit(main())
