"""`python -m amoskys` is the `amoskys` command."""

from amoskys.cli import main

raise SystemExit(main())
