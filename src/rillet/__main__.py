"""``python -m rillet``: the same as the ``rillet`` script."""

from rillet.cli import main

raise SystemExit(main())
