"""``python -m earwitness``: the ``earwitness`` command."""

import sys

from earwitness.cli import main

sys.exit(main())
