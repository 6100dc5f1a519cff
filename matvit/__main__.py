"""`python -m matvit ...` (and `torchrun ... -m matvit train ...`) is the `matvit` command; the one module of
`matvit/` that imports the app."""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main())
