"""``python -m incseg_fast.bench``: the benchmark report (see incseg_fast.bench.report)."""

import sys

from .report import main

sys.exit(main())
