"""A sparse path for Horovod: ``gradsparse.integrations.horovod.DistributedOptimizer``.

Horovod's own ``Compression`` is dense-only: it compresses a tensor, then allreduces it.
This optimizer runs, for each gradient as autograd finishes it, the same stages as the DDP
hook (compensate, select, communicate, commit, write) with the same compressors, error
feedback and collectives, over :class:`~gradsparse.comm.HorovodBackend`: Horovod's
allgather, alltoall and allreduce. Every gradient is its own unit (as the DDP hook's
``scope="layer"``), so per parameter the result equals the DDP hook's; error feedback is
committed only after the sum, and headers are validated on every rank. It uses Horovod's
public API only and patches nothing.

It is a ``torch.optim.Optimizer`` that shares its parameter groups and state with the
optimizer it wraps, so ``torch.optim.lr_scheduler`` drives it as usual::

    import horovod.torch as hvd
    import gradsparse.integrations.horovod as gsh
    hvd.init()
    opt = gsh.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compressor="topk", density=0.01)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10)
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from gradsparse import compressors as _compressors
from gradsparse.checks import check_named_parameters
from gradsparse.compressors import Compressor
from gradsparse.engine import SparseHookState
from gradsparse.engine.reduce import end_step, reduce_gradients

__all__ = ["DistributedOptimizer", "SparseDistributedOptimizer"]

logger = logging.getLogger(__name__)


def _horovod_backend() -> Any:
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ImportError(
            "gradsparse.integrations.horovod needs Horovod; build it for this torch with scripts/install-horovod"
        ) from exc
    if not hvd.is_initialized():
        raise RuntimeError("Horovod is not initialised: call hvd.init() before creating the DistributedOptimizer")
    from gradsparse.comm.horovod_backend import HorovodBackend

    return HorovodBackend()


def _names(optimizer: torch.optim.Optimizer, named_parameters: Optional[Iterable[Any]]) -> List[Tuple[str, Any]]:
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if named_parameters is None:
        return [(f"param{i}", p) for i, p in enumerate(params)]
    pairs = check_named_parameters(named_parameters)
    named = {id(p) for _, p in pairs}
    if any(id(p) not in named for p in params):
        raise ValueError("named_parameters does not name every parameter of the optimizer")
    return pairs


class SparseDistributedOptimizer(torch.optim.Optimizer):
    """Wraps an optimizer: each gradient is summed across Horovod ranks by the sparse
    hook's stages as soon as autograd has accumulated it; ``step()`` waits for them and
    steps the wrapped optimizer."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Optional[Iterable[Tuple[str, torch.nn.Parameter]]],
        compressor: Compressor,
        *,
        error_feedback: bool = True,
        momentum: float = 0.0,
        min_compress_numel: int = 1024,
        collective: str = "allgather",
        backward_passes_per_step: int = 1,
    ) -> None:
        backend = _horovod_backend()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"Expected argument `optimizer` to be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if backward_passes_per_step != 1:
            raise ValueError(
                "gradsparse.integrations.horovod supports backward_passes_per_step=1 only (use larger batches instead)"
            )
        pairs = _names(optimizer, named_parameters)
        # the wrapped optimizer's own group dicts: a scheduler's changes reach it
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.state = optimizer.state
        self.hook_state = SparseHookState(
            compressor,
            error_feedback=error_feedback,
            momentum=momentum,
            collective=collective,
            backend=backend,
            min_compress_numel=min_compress_numel,
            scope="layer",
            named_parameters=pairs,
        )
        self._pending: List[torch.futures.Future[torch.Tensor]] = []
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        self._hooks = [p.register_post_accumulate_grad_hook(self._reduce) for p in params]

    def _reduce(self, param: torch.Tensor) -> None:
        grad = param.grad
        assert grad is not None
        if not grad.is_contiguous():
            param.grad = grad = grad.contiguous()
        self._pending.append(reduce_gradients(self.hook_state, grad.view(-1), [param]))

    def synchronize(self) -> None:
        """Wait for every gradient's sum; the averaged gradients are then in ``.grad``."""
        pending, self._pending = self._pending, []
        for fut in pending:
            fut.wait()
        if pending:
            end_step(self.hook_state)

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:  # type: ignore[override]
        self.synchronize()
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._pending:
            raise RuntimeError("zero_grad() while gradients are still being communicated; call step() first")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def bytes_sent(self) -> int:
        return int(self.hook_state.stats()["bytes_sent"])

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state plus the hook state (residuals keyed by name)."""
        return {"optimizer": self.optimizer.state_dict(), "hook": self.hook_state.state_dict()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state_dict["optimizer"])
        self.hook_state.load_state_dict(state_dict["hook"])


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Optional[Iterable[Tuple[str, torch.nn.Parameter]]] = None,
    compressor: Union[str, Compressor] = "topk",
    *,
    error_feedback: bool = True,
    momentum: float = 0.0,
    min_compress_numel: int = 1024,
    collective: str = "allgather",
    backward_passes_per_step: int = 1,
    **params: Any,
) -> SparseDistributedOptimizer:
    """Like ``hvd.DistributedOptimizer``, with sparse communication for large gradients.
    ``params`` are the compressor's (``density=``, ``threshold=``, ...)."""
    if isinstance(compressor, str):
        compressor = _compressors.build(compressor, **params)
    elif params:
        raise ValueError(f"unknown option(s) {sorted(params)}: compressor parameters go with a compressor name")
    return SparseDistributedOptimizer(
        optimizer,
        named_parameters,
        compressor,
        error_feedback=error_feedback,
        momentum=momentum,
        min_compress_numel=min_compress_numel,
        collective=collective,
        backward_passes_per_step=backward_passes_per_step,
    )
