"""`python -m eqakit ...` (needed for `torchrun -m eqakit train ...`)."""

from eqakit.cli import main

raise SystemExit(main())
