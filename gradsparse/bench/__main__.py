"""``python -m gradsparse.bench`` is ``gradsparse-bench``."""

import sys

from gradsparse.bench.bench_cli import main

sys.exit(main())
