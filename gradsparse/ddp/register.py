"""``register_sparse_hook``: build a state and register the hook in one line."""

from __future__ import annotations

from typing import Any, Optional, Union

import torch

from gradsparse import compressors as _compressors
from gradsparse.compressors import Compressor
from gradsparse.engine.options import HookOptions
from gradsparse.engine.state import SparseHookState

from .hook import sparse_allreduce_hook

__all__ = ["register_sparse_hook"]

#: keyword arguments of SparseHookState that are not HookOptions fields
_STATE_ARGS = {"collective", "process_group", "backend", "named_parameters", "grad_scaler", "masker", "route"}


def _check_ddp(ddp: Any) -> None:
    if isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        if getattr(ddp, "_comm_hooks", None):
            hook, _ = ddp._comm_hooks[0]
            raise ValueError(
                f"this DDP model already has a communication hook ({getattr(hook, '__qualname__', hook)}); DDP "
                "takes one hook per model, registered once"
            )
        return
    kind = type(ddp).__name__
    if _is_fsdp(ddp):
        hint = "FSDP shards gradients with a reduce-scatter and takes no DDP comm hook"
    elif isinstance(ddp, torch.nn.DataParallel):
        hint = "DataParallel is single-process; use DistributedDataParallel with one process per device"
    else:
        hint = "wrap the model in torch.nn.parallel.DistributedDataParallel first"
    raise ValueError(
        f"Expected argument `ddp` to be a torch.nn.parallel.DistributedDataParallel model, but got {kind}: {hint}."
    )


def _is_fsdp(model: Any) -> bool:
    """FSDP1's wrapper, or a module that FSDP2's ``fully_shard`` turned into an FSDPModule."""
    try:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(model, (FSDPModule, FullyShardedDataParallel))


def register_sparse_hook(
    ddp: torch.nn.parallel.DistributedDataParallel,
    compressor: Union[str, Compressor] = "topk",
    *,
    state: Optional[SparseHookState] = None,
    **options: Any,
) -> SparseHookState:
    """Build a :class:`SparseHookState` and register :func:`sparse_allreduce_hook` on ``ddp``.

    ``options`` takes the compressor's own parameters (``density=``, ``threshold=``, ...)
    and the hook options of :class:`SparseHookState`. Or pass a ready ``state`` (for
    instance one restored from a checkpoint, or built in a parent process): it is attached
    to ``ddp.module``'s parameter names. A DDP model takes one hook, and a state serves
    one model.
    """
    _check_ddp(ddp)
    if state is not None:
        if options:
            raise ValueError(f"pass either `state` or options {sorted(options)}, not both")
        state.bind(ddp)
        ddp.register_comm_hook(state, sparse_allreduce_hook)
        return state
    hook_options = HookOptions.names() | _STATE_ARGS
    state_kwargs = {k: v for k, v in options.items() if k in hook_options}
    compressor_kwargs = {k: v for k, v in options.items() if k not in hook_options}
    if isinstance(compressor, str):
        compressor = _compressors.build(compressor, **compressor_kwargs)
    elif compressor_kwargs:
        raise ValueError(
            f"unknown option(s) {sorted(compressor_kwargs)}: compressor parameters go with a "
            f"compressor name; hook options are {sorted(hook_options)}"
        )
    state_kwargs.setdefault("named_parameters", ddp.module.named_parameters())
    state = SparseHookState(compressor, **state_kwargs)
    state.bind(ddp)
    ddp.register_comm_hook(state, sparse_allreduce_hook)
    return state
