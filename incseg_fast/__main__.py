"""``python -m incseg_fast`` runs the ``incseg-fast`` command line."""

import sys

from .cli import main

sys.exit(main())
