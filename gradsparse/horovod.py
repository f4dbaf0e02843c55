"""A sparse path for Horovod: ``gradsparse.horovod.DistributedOptimizer``.

Horovod's own ``Compression`` is dense-only: it compresses a tensor, then allreduces it.
This wrapper mirrors ``hvd.DistributedOptimizer`` but, for each large gradient, selects a
sparse payload with the same compressors and error feedback as the DDP hook and sums the
payloads with ``hvd.allgather`` of indices and values (variable sizes per rank), adding
them in rank order. Small gradients (biases, norms) keep Horovod's own path: its fused
dense ``allreduce``. It uses Horovod's public API only and patches nothing.

Per parameter, the result equals the DDP hook's with ``scope="layer"``: the same
selection, and the same rank-ordered sum.

    import horovod.torch as hvd
    import gradsparse.horovod as gsh
    hvd.init()
    opt = gsh.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                   compressor="topk", density=0.01)
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from gradsparse import compressors as _compressors
from gradsparse._validate import check_int
from gradsparse.compressors import Compressor, CompressorState
from gradsparse.error_feedback import ErrorFeedback

__all__ = ["DistributedOptimizer", "SparseDistributedOptimizer"]

logger = logging.getLogger(__name__)


def _horovod() -> Any:
    try:
        import horovod.torch as hvd
    except ImportError as exc:
        raise ImportError(
            "gradsparse.horovod needs Horovod; build it for this torch with scripts/install-horovod"
        ) from exc
    if not hvd.is_initialized():
        raise RuntimeError("Horovod is not initialised: call hvd.init() before creating the DistributedOptimizer")
    return hvd


class SparseDistributedOptimizer:
    """Wraps an optimizer: gradients are summed across Horovod ranks (sparse for large
    tensors, Horovod's fused dense allreduce for small ones) before ``step()``."""

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Optional[Iterable[Tuple[str, torch.nn.Parameter]]],
        compressor: Compressor,
        *,
        error_feedback: bool = True,
        momentum: float = 0.0,
        min_compress_numel: int = 1024,
        backward_passes_per_step: int = 1,
    ) -> None:
        self._hvd = _horovod()
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(
                f"Expected argument `optimizer` to be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if backward_passes_per_step != 1:
            raise ValueError("gradsparse.horovod supports backward_passes_per_step=1 only (use larger batches instead)")
        self.optimizer = optimizer
        self.compressor = compressor
        self.min_compress_numel = check_int("min_compress_numel", min_compress_numel)
        self.error_feedback = ErrorFeedback(momentum) if error_feedback else None
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if named_parameters is not None:
            pairs = list(named_parameters)
            if not all(isinstance(n, str) and isinstance(p, torch.Tensor) for n, p in pairs):
                raise ValueError(
                    "Expected argument `named_parameters` to be (name, parameter) pairs, "
                    "usually produced by `model.named_parameters()`."
                )
            names = {id(p): n for n, p in pairs}
            missing = [i for i, p in enumerate(params) if id(p) not in names]
            if missing:
                raise ValueError("named_parameters does not name every parameter of the optimizer")
        else:
            names = {id(p): f"param{i}" for i, p in enumerate(params)}
        self._names: Dict[int, str] = names
        self._states: Dict[str, CompressorState] = {}
        self._pending: Dict[str, Tuple[torch.Tensor, Any, Any, int]] = {}
        self.bytes_sent = 0
        self.step_count = 0
        self._hooks = [
            p.register_post_accumulate_grad_hook(self._make_hook(names[id(p)])) for p in params if p.requires_grad
        ]

    # Communication -----------------------------------------------------------------------

    def _make_hook(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(param: torch.Tensor) -> None:
            self._start(name, param)

        return hook

    def _start(self, name: str, param: torch.Tensor) -> None:
        hvd = self._hvd
        grad = param.grad
        assert grad is not None
        flat = grad.view(-1)
        if flat.numel() < self.min_compress_numel:  # Horovod's own fused dense path
            handle = hvd.allreduce_async_(grad, name=f"gradsparse.dense.{name}", op=hvd.Average)
            self._pending[name] = (grad, handle, None, 0)
            return
        layout = ((name, flat.numel()),)
        work = flat.clone()
        velocity = self.error_feedback.compensate(layout, work) if self.error_feedback else None
        state = self._states.setdefault(name, CompressorState(key=name))
        state.step = self.step_count
        payload = self.compressor.compress(work, state)
        if self.error_feedback is not None:
            self.error_feedback.update(layout, work, payload, 1.0, velocity)
        size = hvd.size()
        self.bytes_sent += (size - 1) * payload.nbytes
        indices = hvd.allgather_async(payload.indices.long(), name=f"gradsparse.idx.{name}")
        values = hvd.allgather_async(payload.values, name=f"gradsparse.val.{name}")
        self._pending[name] = (grad, indices, values, size)

    def synchronize(self) -> None:
        """Wait for every gradient's communication and write the averaged gradients."""
        hvd = self._hvd
        for grad, first, second, size in self._pending.values():
            if second is None:
                hvd.synchronize(first)  # allreduce_async_ averaged in place
                continue
            indices, values = hvd.synchronize(first), hvd.synchronize(second)
            out = grad.view(-1)
            out.zero_()
            out.index_add_(0, indices, values.to(out.dtype))  # rank order: 0 + r0 + r1 + ...
            out.div_(size)
        self._pending.clear()

    # The optimizer interface ----------------------------------------------------------------

    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        self.synchronize()
        self.step_count += 1
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._pending:
            raise RuntimeError("zero_grad() while gradients are still being communicated; call step() first")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> List[Dict[str, Any]]:
        return self.optimizer.param_groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    def state_dict(self) -> Dict[str, Any]:
        """The wrapped optimizer's state plus the residuals (keyed by parameter name)."""
        return {
            "optimizer": self.optimizer.state_dict(),
            "error_feedback": self.error_feedback.state_dict() if self.error_feedback else None,
            "step": self.step_count,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        if self.error_feedback is not None and state.get("error_feedback") is not None:
            self.error_feedback.load_state_dict(state["error_feedback"])
        self.step_count = int(state.get("step", 0))


def DistributedOptimizer(
    optimizer: torch.optim.Optimizer,
    named_parameters: Optional[Iterable[Tuple[str, torch.nn.Parameter]]] = None,
    compressor: str | Compressor = "topk",
    *,
    error_feedback: bool = True,
    momentum: float = 0.0,
    min_compress_numel: int = 1024,
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
        backward_passes_per_step=backward_passes_per_step,
    )
