"""``python -m nestrnn``: the same as the ``nestrnn`` command."""

import sys

from nestrnn.cli import main

sys.exit(main())
