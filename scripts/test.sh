#!/usr/bin/env bash
# Set up a virtual environment for one interpreter and run the test suite.
#   bash scripts/test.sh                 # python3 (3.11: JAX 0.10.2 + torch/mergekit peers as oracles)
#   bash scripts/test.sh /path/python3.12  # newest JAX; peer-oracle tests skip (no torch wheel for 3.12 here)
# Extra arguments after the interpreter go to pytest.
set -euo pipefail
PY=${1:-python3}
shift || true
cd "$(dirname "$0")/.."
VER=$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
VENV=".venv-$VER"
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null
EXTRAS="test,demo"
if [ "$VER" = "3.11" ]; then
  EXTRAS="test,demo,peers"        # torch==2.13.0 CPU wheel is on disk for cp311
  "$VENV/bin/python" -m pip install -q "jax==0.10.2" "jaxlib==0.10.2"
fi
"$VENV/bin/python" -m pip install -q -e ".[$EXTRAS]"
"$VENV/bin/python" -c 'import jax, sys; print(f"python {sys.version.split()[0]}  jax {jax.__version__}  devices {jax.devices()}")'
# --max-worker-restart 0: a crashed worker ends the run at once (pytest-xdist 3.8's loadfile scheduler can
# wait forever after replacing a crashed worker: pytest-dev/pytest-xdist#784, #1378)
# --durations 25: the slowest tests in the log (CI time is a budget: aim under 20 min)
exec "$VENV/bin/python" -m pytest -q -n 2 --dist loadfile --max-worker-restart 0 --durations 25 "$@" tests
