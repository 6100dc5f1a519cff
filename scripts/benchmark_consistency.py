"""`matvit bench consistency` as a script: MatViT against independently trained baselines.

    python scripts/benchmark_consistency.py --dataset fashion-mnist --preset matvit-small-fmnist \
        --seeds 0,1,2 --baselines S --out runs/consistency --reuse
"""

import sys

from app.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "consistency", *sys.argv[1:]]))
