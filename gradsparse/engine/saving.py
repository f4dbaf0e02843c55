"""The checkpoint format of :class:`~gradsparse.SparseHookState`: tensors and plain values
only, so ``torch.load(..., weights_only=True)`` reads it, and checked on the way back in.

Every rank saves its own (residuals and the preconditioner's second moments differ by
rank); :func:`gradsparse.reshard_states` carries a set of them to another world size."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

from gradsparse.precondition import AdamPreconditioner

from .stats import HookStats

if TYPE_CHECKING:
    from .state import SparseHookState

__all__ = ["STATE_FORMAT", "load_state_dict", "state_dict"]

STATE_FORMAT = "gradsparse.SparseHookState/1"


def state_dict(hook: SparseHookState) -> Dict[str, Any]:
    """Residuals, compressor state, the preconditioner's moments, step and statistics."""
    out = {
        "format": STATE_FORMAT,
        "compressor": hook.compressor.name,
        "step": hook.step,
        "start_step": hook.options.start_step,  # SparseAdamW's warm-up moves them
        "density_warmup_steps": hook.options.density_warmup_steps,
        "sign_warmup_steps": hook.options.sign_warmup_steps,
        "error_feedback": hook.feedback.state_dict(),
        **hook.selection.state_dict(),
        "stats": hook.counters.state_dict(),
    }
    if hook.preconditioner is not None:
        out["preconditioner"] = hook.preconditioner.state_dict()
    return out


def load_state_dict(hook: SparseHookState, state: Dict[str, Any]) -> None:
    """Restore ``hook`` from what :func:`state_dict` saved (with the same compressor)."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"not a SparseHookState state_dict (expected format {STATE_FORMAT!r}, got {found!r})")
    if state["compressor"] != hook.compressor.name:
        raise ValueError(
            f"state_dict was saved with compressor {state['compressor']!r}, this state uses {hook.compressor.name!r}"
        )
    hook.step = int(state["step"])
    warm_up = (state.get(name, 0) for name in ("start_step", "density_warmup_steps", "sign_warmup_steps"))
    hook.warm_up(*(int(steps) for steps in warm_up))
    hook.feedback.load_state_dict(state["error_feedback"])
    hook.selection.load_state_dict(state)
    saved = state.get("preconditioner")
    if saved is not None:
        if hook.preconditioner is None:
            hook.precondition(AdamPreconditioner(saved["beta2"], saved["eps"], saved.get("beta1", 0.0)))
        assert hook.preconditioner is not None
        hook.preconditioner.load_state_dict(saved)
    hook.counters = HookStats(**state["stats"])
    hook.planner.plans.clear()
    if not hook.names.attached and any(not n.startswith("param") for n in hook.feedback.names()):
        hook.names.attach_required = (
            "this state holds residuals keyed by parameter name (restored from a checkpoint); "
            "call state.attach(model.named_parameters()) before training (register_sparse_hook does this)"
        )
