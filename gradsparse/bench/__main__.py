"""``python -m gradsparse.bench`` is ``gradsparse-bench``."""

import sys

from gradsparse.bench.cli import main

sys.exit(main())
