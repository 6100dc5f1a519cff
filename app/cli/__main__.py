"""`python -m app.cli ...` is the `matvit` command."""

import sys

from app.cli import main

sys.exit(main())
