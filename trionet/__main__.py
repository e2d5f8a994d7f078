"""``python -m trionet``: the ``trionet`` command line."""

from trionet._cli import main

raise SystemExit(main())
