"""``gradsparse-bench``: one concern per module.

=============  ==================================================================
``configs``    what a sweep measures
``cluster``    the emulated cluster: network namespaces, veth pairs, ``tc tbf``
``step``       the benchmark rank: check, then time full DDP steps (run as a module)
``models``     the model layouts of ``run --model``; ``model_step`` times their steps
``sweep``      the parent: start ranks per group, follow them, derive ratios
``tables``     the Markdown table and plots (through :mod:`gradsparse.report`)
``select``     the selection micro-benchmark
``quality``    validation loss of a character GPT, dense against sparse, per optimizer
``bench_cli``  argparse and :func:`main`
=============  ==================================================================
"""

from __future__ import annotations

from .bench_cli import main

__all__ = ["main"]
