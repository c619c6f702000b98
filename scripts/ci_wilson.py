"""Wilson confidence intervals for accuracies given on the command line (the fork's `ci_wilson` helper,
docs/compatibility.md section 10.2), with the z of every confidence level computed exactly.

    python scripts/ci_wilson.py --exact-k 84 --exact-n 100 --token-p 0.995 --token-n 90000 --confidence 0.99
"""

import argparse
import os
import sys
from typing import List, Optional

# Run as a plain script from anywhere: make the repository root importable.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from utils.stats import wilson_interval, z_for_confidence  # noqa: E402

# (flag prefix, printed name)
METRICS = [("", "accuracy"), ("exact-", "exact_accuracy"), ("token-", "token_accuracy")]


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--confidence", type=float, default=0.95, help="two-sided confidence level (default 0.95)")
    for prefix, name in METRICS:
        parser.add_argument(f"--{prefix}p", type=float, help=f"observed {name} (wins over k/n)")
        parser.add_argument(f"--{prefix}k", type=int, help=f"successes for {name}")
        parser.add_argument(f"--{prefix}n", type=int, help=f"trials for {name} (required with p or k)")
    args = parser.parse_args(argv)

    if not 0.0 < args.confidence < 1.0:
        parser.error(f"--confidence must be strictly between 0 and 1, got {args.confidence}")
    z = z_for_confidence(args.confidence)

    rows = []
    for prefix, name in METRICS:
        dest = prefix.replace("-", "_")
        p, k, n = (getattr(args, dest + field) for field in "pkn")
        if p is None and k is None and n is None:
            continue
        if n is None:
            parser.error(f"--{prefix}n is required with --{prefix}p or --{prefix}k")
        if p is None and k is None:
            parser.error(f"give --{prefix}p or --{prefix}k with --{prefix}n")
        if n <= 0:
            parser.error(f"--{prefix}n must be positive, got {n}")
        rows.append((name, p if p is not None else k / n, n))
    if not rows:
        parser.error("give at least one metric: --p/--k/--n, --exact-p/-k/-n or --token-p/-k/-n")

    print(f"Wilson {100 * args.confidence:g}% confidence intervals:")
    for name, p, n in rows:
        # The interval uses p clamped to [0, 1]; the line shows p as given, so a typo stays visible.
        lo, hi = wilson_interval(min(max(p, 0.0), 1.0), n, z)
        print(f"- {name}: p={p:.6f}, n={n} -> CI: [{lo:.6f}, {hi:.6f}]  (half-width={(hi - lo) / 2:.6f})")


if __name__ == "__main__":
    main()
