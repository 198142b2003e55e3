"""``python -m jmerge.cli``: the jmerge command line."""

import sys

from jmerge.cli import main

sys.exit(main())
