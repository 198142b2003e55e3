"""Twin-Merging, SMILE and WEMoE on the digits 8-task benchmark, tuned on validation, reported on test.

Usage: python3 scripts/quality_dynamic.py [--methods twin smile wemoe] [--update] [--out-dir docs/quality]
[--cache-dir DIR] [--seed 0]

Runs the dynamic rows of the quality benchmark (:mod:`jmerge.demo.dynamic`: every structural hyperparameter
chosen by a loop over a small grid on the validation split, test accuracy of the chosen setting, bytes stored
against one model and against the 8 fine-tuned models) and prints them with the reference rows. With
``--update`` the rows are merged into ``OUT_DIR/results.json`` and every output is rewritten (the same as
``scripts/quality_benchmark.py --methods twin smile wemoe --update``). Diagnostics (router accuracy, SMILE with
routing forced to the true task, WEMoE's entropy and routing after adaptation) are printed too.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--methods", nargs="+", default=["twin_merging", "smile", "wemoe"])
    ap.add_argument("--update", action="store_true", help="merge the rows into OUT_DIR/results.json")
    ap.add_argument("--out-dir", default=os.path.join(os.path.dirname(__file__), "..", "docs", "quality"))
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)

    from jmerge.demo import FULL, format_table, run_demo

    methods = [m.strip() for arg in a.methods for m in arg.split(",") if m.strip()]
    res = run_demo(config=FULL, out_dir=os.path.normpath(a.out_dir) if a.update else None, cache_dir=a.cache_dir,
                   methods=methods, seed=a.seed, quiet=True, update=a.update)
    print(format_table(res, storage=True))
    for r in res["rows"]:
        if r.get("diagnostics"):
            print(f"{r['method']}: {r['diagnostics']}")
    if res["skipped"]:
        print("not run: " + "; ".join(f"{k} ({v})" for k, v in sorted(res["skipped"].items())))


if __name__ == "__main__":
    main()
