"""``python -m gradsparse.train`` is ``gradsparse-train``."""

import sys

from gradsparse.train.cli import main

sys.exit(main())
