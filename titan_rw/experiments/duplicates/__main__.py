"""`python -m titan_rw.experiments.duplicates`."""

from titan_rw.experiments.duplicates.cli import main

raise SystemExit(main())
