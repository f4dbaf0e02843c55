"""``gradsparse-bench``: one concern per module.

===========  ==================================================================
``configs``  what a sweep measures
``step``     the benchmark rank: check, then time full DDP steps (run as a module)
``sweep``    the parent: start ranks per group, follow them, derive ratios
``tables``   the Markdown table and plots (through :mod:`gradsparse.report`)
``select``   the selection micro-benchmark
``cli``      argparse and :func:`main`
===========  ==================================================================
"""

from __future__ import annotations

from .cli import main

__all__ = ["main"]
