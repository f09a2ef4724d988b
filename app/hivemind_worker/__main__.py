"""`python -m hivemind_worker` runs the command-line interface."""

from hivemind_worker.cli import main

raise SystemExit(main())
