"""`python -m matvit ...` (and `torchrun ... -m matvit train ...`) is the `matvit` command."""

from app.cli import main

if __name__ == "__main__":
    main()
