"""Checked by mypy (see setup.cfg), never run: the seams between the pieces have real
types, not ``Any``. ``assert_type`` fails the type check if an expression's type differs."""

from __future__ import annotations

import torch
from typing_extensions import assert_type

import gradsparse as gs
from gradsparse.comm import Backend, Collective, Reduced
from gradsparse.compressors import Compressor
from gradsparse.engine.policy import Decision
from gradsparse.error_feedback import ErrorFeedback


def seams(state: gs.SparseHookState, payload: gs.SparsePayload) -> None:
    assert_type(state.collective, Collective)
    assert_type(state.backend, Backend)
    assert_type(state.compressor, Compressor)
    assert_type(state.feedback, ErrorFeedback)
    plan = state.planner.plan([])
    assert_type(state.policy.decide(0, plan, state.backend, torch.zeros(1)), Decision)
    assert_type(state.collective.reduce(payload, state.backend), torch.futures.Future[Reduced])
