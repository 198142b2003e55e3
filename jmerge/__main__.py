import sys

from jmerge.cli import main

sys.exit(main())
