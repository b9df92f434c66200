"""``python -m client ...``: the same as ``fedkd teacher ...``."""

import sys

from client.cli import main

sys.exit(main())
