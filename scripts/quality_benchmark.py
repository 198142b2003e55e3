"""Full digits merging benchmark: writes docs/quality/results.{md,csv,json} and accuracy.png.

Usage: python3 scripts/quality_benchmark.py [--out-dir docs/quality] [--cache-dir DIR] [--methods a,b]
[--reduced] [--seed 0]

Trains (or loads from the cache; the same models as ``jmerge demo``) the models of :mod:`jmerge.demo`,
chooses every available jmerge method's hyperparameters on the validation split with a sweep
(``jmerge.demo.bench.SWEEPS``), merges the 8 fine-tuned backbones with the chosen setting, reports test
accuracy, prints the table and writes the outputs.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jmerge.demo import FULL, REDUCED, run_demo  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "docs", "quality"))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--methods", default=None, help="comma-separated method names (default: all)")
    ap.add_argument("--reduced", action="store_true", help="the reduced (demo) configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else None
    run_demo(config=REDUCED if a.reduced else FULL, out_dir=os.path.normpath(a.out_dir), cache_dir=a.cache_dir,
             methods=methods, seed=a.seed, quiet=a.quiet)


if __name__ == "__main__":
    main()
