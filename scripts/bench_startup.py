"""Wall time of the command line's start-up: ``jmerge --help``, ``jmerge methods``, ``import jmerge``, against
``python -c 'import jax'`` (what every command that merges pays once).

Each command runs ``--repeat`` times in a fresh process (after one untimed run that warms the page cache);
the table gives the best and the median wall time.

Usage: python scripts/bench_startup.py [--repeat 7]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time


def _jmerge() -> list[str]:
    exe = os.path.join(os.path.dirname(sys.executable), "jmerge")
    if os.path.exists(exe):
        return [exe]
    found = shutil.which("jmerge")
    return [found] if found else [sys.executable, "-m", "jmerge.cli"]


def wall(cmd: list[str], repeat: int) -> list[float]:
    """Wall seconds of ``repeat`` runs of ``cmd`` (stdout discarded), after one untimed run."""
    subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        subprocess.run(cmd, stdout=subprocess.DEVNULL, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeat", type=int, default=7)
    a = p.parse_args(argv)
    jm = _jmerge()
    rows = [("jmerge --help", jm + ["--help"]), ("jmerge methods", jm + ["methods"]),
            ("python -c 'import jmerge'", [sys.executable, "-c", "import jmerge"]),
            ("python -c 'pass'", [sys.executable, "-c", "pass"]),
            ("python -c 'import jax'", [sys.executable, "-c", "import jax"])]
    print(f"python {sys.version.split()[0]}, {a.repeat} runs each (after one warm-up)")
    print(f"{'command':<28} {'best s':>8} {'median s':>9}")
    for label, cmd in rows:
        ts = wall(cmd, a.repeat)
        print(f"{label:<28} {min(ts):>8.3f} {statistics.median(ts):>9.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
