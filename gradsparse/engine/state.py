"""The state of the sparse hook: options, the stores keyed by parameter name, and
checkpointing and pickling. It decides and computes nothing itself: the policy decides,
the hook's stages compute."""

from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional, Set, Tuple, Union

import torch
import torch.distributed as dist

from gradsparse import compressors as _compressors
from gradsparse.comm import Backend, Collective, TorchDistBackend
from gradsparse.comm import build as build_collective
from gradsparse.compressors import Compressor
from gradsparse.error_feedback import ErrorFeedback
from gradsparse.masking import WeightMasker
from gradsparse.precondition import AdamPreconditioner

from . import saving
from .compressor_states import CompressorStates
from .options import HookOptions
from .plan import BucketPlanner, ParamNames
from .policy import Policy
from .saving import STATE_FORMAT
from .stats import HookStats

__all__ = ["STATE_FORMAT", "SparseHookState"]

logger = logging.getLogger(__name__)


class SparseHookState:
    """State of :func:`~gradsparse.sparse_allreduce_hook`. The keyword arguments not listed
    below (``error_feedback``, ``momentum``, ``start_step``, ...) are :class:`HookOptions`'s.

    Args:
        compressor: a :class:`~gradsparse.compressors.Compressor`, or a registered name
            (built with its default parameters).
        collective: name of a ``gradsparse.comm`` collective, or an instance.
        process_group: the group to sum over (default: the world). Dropped on pickling.
        backend: a ready ``gradsparse.comm.Backend`` (e.g. ``MPIBackend``) instead of
            ``torch.distributed`` on ``process_group``.
        named_parameters: ``model.named_parameters()``, so that state is keyed by name.
            Without it, parameters are named in the order the hook first sees them.
        grad_scaler: a ``torch.amp.GradScaler``; residuals then follow loss-scale changes.
        masker: a :class:`~gradsparse.masking.WeightMasker`: masked coordinates are skipped.
        route: the registered route of the sparse steps (see :mod:`gradsparse.engine.routes`);
            default: the one that serves ``collective``.
    """

    preconditioner: Optional[AdamPreconditioner] = None  # for states pickled before it existed

    def __init__(
        self,
        compressor: Union[Compressor, str] = "topk",
        *,
        error_feedback: bool = True,
        momentum: float = 0.0,
        collective: Union[str, Collective] = "allgather",
        process_group: Optional[dist.ProcessGroup] = None,
        backend: Optional[Backend] = None,
        min_compress_numel: int = 1024,
        start_step: int = 0,
        density_warmup_steps: int = 0,
        warmup_initial_density: float = 0.25,
        sign_warmup_steps: int = 0,
        scope: str = "bucket",
        named_parameters: Optional[Iterable[Tuple[str, torch.nn.Parameter]]] = None,
        grad_scaler: Optional[Any] = None,
        masker: Optional[WeightMasker] = None,
        log_every: int = 0,
        sync_free: Optional[bool] = None,
        route: Optional[str] = None,
    ) -> None:
        self.compressor: Compressor = _compressor(compressor)
        self.options = HookOptions(
            error_feedback=error_feedback, momentum=momentum, min_compress_numel=min_compress_numel,
            start_step=start_step, density_warmup_steps=density_warmup_steps,
            warmup_initial_density=warmup_initial_density, sign_warmup_steps=sign_warmup_steps, scope=scope,
            log_every=log_every, sync_free=sync_free,
        )  # fmt: skip
        if masker is not None and not isinstance(masker, WeightMasker):
            raise ValueError(f"Expected argument `masker` to be a gradsparse WeightMasker, but got {masker!r}.")
        self.options.check_against(self.compressor, masker)
        self.collective: Collective = collective if isinstance(collective, Collective) else build_collective(collective)
        self.masker = masker
        self.grad_scaler = grad_scaler

        # Communication (not pickled) -------------------------------------------------------
        self.process_group = process_group
        self._backend = backend

        # State keyed by parameter name, and the policy's memory ----------------------------
        self.step = 0
        self.feedback = ErrorFeedback(momentum)
        self.selection = CompressorStates(self.compressor, scope)
        self.names = ParamNames()
        self.planner = BucketPlanner(self.names, min_compress_numel)
        #: Adam's second moment of this rank's gradients, divided out before compression;
        #: installed by :class:`gradsparse.optim.SparseAdamW` (see :mod:`gradsparse.precondition`)
        self.preconditioner: Optional[AdamPreconditioner] = None
        self.policy = Policy(self.compressor, self.options, self.collective, masker, route)
        if named_parameters is not None:
            self.attach(named_parameters)

        # Statistics, and the parameters compiled DDP has handed over this step ---------------
        self.counters = HookStats()
        self.compiled_seen: Set[int] = set()
        self._bound: Optional[int] = None  # id() of the DDP model served (not pickled)

    def attach(self, named_parameters: Iterable[Tuple[str, torch.nn.Parameter]]) -> SparseHookState:
        """Key state by these names (``model.named_parameters()``; for a DDP model the
        names of ``ddp.module``)."""
        self.names.attach(named_parameters)
        self.planner.plans.clear()
        return self

    def precondition(self, preconditioner: AdamPreconditioner) -> None:
        """Divide every gradient by ``preconditioner``'s second moment before compression,
        from the next bucket on (the optimizer must then expect normalised gradients, as
        :class:`gradsparse.optim.SparseAdamW` does)."""
        if not isinstance(preconditioner, AdamPreconditioner):
            raise ValueError(f"Expected argument `preconditioner` to be an AdamPreconditioner, got {preconditioner!r}.")
        self.preconditioner = preconditioner
        self.planner.name_all = True
        self.planner.plans.clear()

    def warm_up(self, dense: int, ramp: int = 0, signs: int = 0) -> None:
        """SparseAdamW's warm-up: dense before step ``dense``, then ``signs`` steps of the sign
        warm-up and ``ramp`` of the density ramp, at least (:meth:`HookOptions.warmed_up`)."""
        self.options = self.policy.options = self.options.warmed_up(dense, ramp, self.compressor, signs)

    def bind(self, ddp: torch.nn.Module) -> None:
        """Serve this DDP model (one per state): attach its parameter names, unless the
        state was attached to this model already."""
        if self._bound is not None and self._bound != id(ddp):
            raise ValueError(
                "this SparseHookState is already registered on another DDP model: a state holds one "
                "model's residuals; build one state per model"
            )
        module = getattr(ddp, "module", ddp)
        mine = set(self.names.by_id)
        if not self.names.attached or any(id(p) not in mine for p in module.parameters()):
            self.attach(module.named_parameters())
        self._bound = id(ddp)

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = TorchDistBackend(self.process_group)
        return self._backend

    def grad_scale(self) -> float:  # the AMP loss scale the gradients carry now (1.0 without)
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return 1.0
        return float(self.grad_scaler.get_scale())

    def stats(self) -> Dict[str, float]:
        return self.counters.summary(self.feedback.residuals.norm())  # this rank's, cumulative

    # Pickling (as PowerSGDState): drop the process group and backend --------------------

    def __getstate__(self) -> Dict[str, Any]:
        return dict(self.__dict__, process_group=None, _backend=None, compiled_seen=set(), _bound=None)

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.planner.plans.clear()
        self.names.rebind()
        self.compiled_seen = set()
        logger.info("SparseHookState unpickled: it will use the default process group")

    # Checkpointing (the format: gradsparse.engine.saving) -----------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Residuals, compressor state, step and statistics; tensors and plain values only,
        so ``torch.load(..., weights_only=True)`` reads it."""
        return saving.state_dict(self)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        saving.load_state_dict(self, state)


def _compressor(compressor: Union[Compressor, str]) -> Compressor:
    if isinstance(compressor, str):
        compressor = _compressors.build(compressor)
    if not isinstance(compressor, Compressor):
        raise ValueError(
            "Expected argument `compressor` to be a gradsparse Compressor or one of "
            f"{_compressors.available()}, but got {compressor!r}."
        )
    return compressor
