"""`python -m ingestd`: the command line (see `ingestd.cli`)."""

from ingestd.cli import main

raise SystemExit(main())
