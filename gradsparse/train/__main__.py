"""``python -m gradsparse.train`` is ``gradsparse-train``."""

import sys

from gradsparse.train.train_cli import main

sys.exit(main())
