"""WEMoE on the digits 8-task benchmark (tuned on validation, test accuracy, storage): an alias of
``python3 scripts/quality_dynamic.py --methods wemoe`` (same options).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality_dynamic import main  # noqa: E402

if __name__ == "__main__":
    argv = sys.argv[1:]
    main(argv if "--methods" in argv else ["--methods", "wemoe", *argv])
