"""``python -m client ...``: the same as ``fedkd teacher ...``."""

import sys

from .cli import main

sys.exit(main())
