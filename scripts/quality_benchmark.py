"""Full digits merging benchmark: writes docs/quality/results.{md,csv,json} and accuracy.png.

Usage: python3 scripts/quality_benchmark.py [--out-dir docs/quality] [--cache-dir DIR] [--methods a b | a,b]
[--update] [--reduced] [--seed 0]

Trains (or loads from the cache; the same models as ``jmerge demo``) the models of :mod:`jmerge.demo`,
chooses every available jmerge method's hyperparameters on the validation split with a sweep
(``jmerge.demo.bench.SWEEPS``), merges the 8 fine-tuned backbones with the chosen setting, reports test
accuracy, prints the table and writes the outputs. The dynamic methods (``twin_merging`` / ``twin``,
``smile``, ``wemoe``; :mod:`jmerge.demo.dynamic`) run with the rest.

``--update`` merges the rows of this run into the existing ``OUT_DIR/results.json`` (rows of the methods
run are replaced, every other row is kept) and rewrites results.md/csv/json and accuracy.png, e.g.
``python scripts/quality_benchmark.py --methods twin smile wemoe --update``.
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
    ap.add_argument("--methods", nargs="+", default=None,
                    help="method names, space- or comma-separated (default: all)")
    ap.add_argument("--update", action="store_true",
                    help="merge these rows into OUT_DIR/results.json instead of replacing the results")
    ap.add_argument("--reduced", action="store_true", help="the reduced (demo) configuration")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quiet", action="store_true")
    a = ap.parse_args(argv)
    methods = [m.strip() for arg in a.methods for m in arg.split(",") if m.strip()] if a.methods else None
    run_demo(config=REDUCED if a.reduced else FULL, out_dir=os.path.normpath(a.out_dir), cache_dir=a.cache_dir,
             methods=methods, seed=a.seed, quiet=a.quiet, update=a.update)


if __name__ == "__main__":
    main()
