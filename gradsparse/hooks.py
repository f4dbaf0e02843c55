"""The sparse DDP communication hook and its state.

``sparse_allreduce_hook(state, bucket)`` follows PyTorch's ``ddp_comm_hooks``: a plain
function of a picklable state and a ``GradBucket`` that returns a future of the averaged
bucket. Per bucket it composes the three independent pieces:

1. error feedback compensates the gradient (``gradsparse.error_feedback``);
2. the compressor selects a sparse payload (``gradsparse.compressors``);
3. error feedback keeps what was not sent;
4. a collective sums the payloads across ranks (``gradsparse.comm``);
5. inside ``Future.then`` the sum is decompressed into ``bucket.buffer()`` and averaged.

Parameters smaller than ``min_compress_numel`` (biases, norms) skip compression and go
dense in one small allreduce per bucket.
"""

# No `from __future__ import annotations` here: DDP compares the hook's annotations
# with dist.GradBucket and torch.futures.Future[torch.Tensor] as objects.
import dataclasses
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple, Union

import torch
import torch.distributed as dist

from gradsparse import compressors as _compressors
from gradsparse._validate import check_choice, check_density, check_int, check_probability
from gradsparse.comm import (
    FLAG_ERROR,
    FLAG_NONFINITE,
    Backend,
    Collective,
    PeerError,
    Reduced,
    TorchDistBackend,
    allreduce_dense,
)
from gradsparse.comm import build as build_collective
from gradsparse.comm.wire import exchange_headers
from gradsparse.compressors import Compressor, CompressorState, NoCompression, k_for_density
from gradsparse.error_feedback import ErrorFeedback, Layout, ParamStore
from gradsparse.masking import WeightMasker
from gradsparse.payload import SparsePayload, index_dtype_for

__all__ = ["SparseHookState", "sparse_allreduce_hook", "register_sparse_hook"]

logger = logging.getLogger(__name__)

_STATE_FORMAT = "gradsparse.SparseHookState/1"
_SCOPES = ("bucket", "layer")


@dataclass
class _BucketPlan:
    """How one bucket's flat buffer splits into compressed and dense parts."""

    layout: Layout  # compressed parameters, canonical order: (name, numel)
    offsets: List[int]  # their offsets in the bucket buffer, same order
    region_start: Optional[int]  # set when they lie contiguous in canonical order
    small: List[Tuple[int, int]]  # (offset, numel) of parameters sent dense
    key: str
    workspace: Optional[torch.Tensor] = None
    mask_version: int = -1  # weight masks: the masker version these were made from
    mask_flat: Optional[torch.Tensor] = None
    active: Optional[torch.Tensor] = None
    active_layout: Layout = ()
    context: Dict[str, Any] = field(default_factory=dict)  # the collective's, per bucket
    small_context: Dict[str, Any] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.layout)


@dataclass
class _Stats:
    steps: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    control_bytes: int = 0
    messages: int = 0
    dense_bytes: int = 0
    selected: int = 0
    compressible: int = 0
    nonfinite_buckets: int = 0
    compress_s: float = 0.0
    communicate_s: float = 0.0
    decompress_s: float = 0.0


class SparseHookState:
    """State of :func:`sparse_allreduce_hook`: configuration, error feedback, compressor
    state keyed by parameter name, and statistics.

    Args:
        compressor: a :class:`~gradsparse.compressors.Compressor`, or a registered name
            (built with its default parameters).
        error_feedback: keep what is not sent and add it to the next gradient.
        momentum: DGC momentum correction factor (0 disables it). Use a momentum-free
            optimizer with it.
        collective: name of a ``gradsparse.comm`` collective, or an instance.
        process_group: the group to sum over (default: the world). Dropped on pickling.
        backend: a ready ``gradsparse.comm.Backend`` (e.g. ``MPIBackend``) instead of
            ``torch.distributed`` on ``process_group``.
        min_compress_numel: parameters with fewer entries are sent dense.
        start_step: steps before this one use a plain dense allreduce (warm-up).
        density_warmup_steps: over this many steps after ``start_step`` the density
            ramps exponentially from ``warmup_initial_density`` to the compressor's own,
            as in DGC. Density-based compressors only.
        scope: ``"bucket"`` selects over the whole bucket, ``"layer"`` per parameter.
        named_parameters: ``model.named_parameters()``, so that state is keyed by name.
            Without it, parameters are named in the order the hook first sees them.
        grad_scaler: a ``torch.amp.GradScaler``; residuals then follow loss-scale
            changes exactly.
        masker: a :class:`~gradsparse.masking.WeightMasker`: masked coordinates are skipped
            (selection runs over active ones; ``none`` sends only active values).
        log_every: log a one-line summary every this many steps on rank 0 (0: never).
    """

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
        scope: str = "bucket",
        named_parameters: Optional[Iterable[Tuple[str, torch.nn.Parameter]]] = None,
        grad_scaler: Optional[Any] = None,
        masker: Optional[WeightMasker] = None,
        log_every: int = 0,
    ) -> None:
        # Hyperparameters -------------------------------------------------------------
        if isinstance(compressor, str):
            compressor = _compressors.build(compressor)
        if not isinstance(compressor, Compressor):
            raise ValueError(
                "Expected argument `compressor` to be a gradsparse Compressor or one of "
                f"{_compressors.available()}, but got {compressor!r}."
            )
        self.compressor = compressor
        if not isinstance(error_feedback, bool):
            raise ValueError(f"Expected argument `error_feedback` to be a bool, but got {error_feedback!r}.")
        self.error_feedback_enabled = error_feedback
        self.momentum = check_probability("momentum", momentum)
        if self.momentum and not error_feedback:
            raise ValueError("Argument `momentum` (DGC momentum correction) needs `error_feedback=True`.")
        self.collective = collective if isinstance(collective, Collective) else build_collective(collective)
        self.min_compress_numel = check_int("min_compress_numel", min_compress_numel)
        self.start_step = check_int("start_step", start_step)
        self.density_warmup_steps = check_int("density_warmup_steps", density_warmup_steps)
        self.warmup_initial_density = float(warmup_initial_density)
        check_density("warmup_initial_density", warmup_initial_density)
        if self.density_warmup_steps and not compressor.density_based:
            raise ValueError(
                f"Argument `density_warmup_steps` needs a density-based compressor "
                f"(topk, sampled_topk, randomk), but the compressor is {compressor.name!r}."
            )
        self.scope = check_choice("scope", scope, _SCOPES)
        self.log_every = check_int("log_every", log_every)
        self.grad_scaler = grad_scaler
        if masker is not None and not isinstance(masker, WeightMasker):
            raise ValueError(f"Expected argument `masker` to be a gradsparse WeightMasker, but got {masker!r}.")
        if masker is not None and compressor.state_buffers:
            raise ValueError(
                f"the {compressor.name!r} compressor keeps per-coordinate state, which weight masks "
                "would reshape; use topk, sampled_topk, threshold, randomk or none with a masker"
            )
        self.masker = masker

        # Communication (not pickled) ------------------------------------------------
        self.process_group = process_group
        self._backend = backend

        # Internal state, keyed by parameter name --------------------------------------
        self.step = 0
        self.error_feedback = ErrorFeedback(self.momentum)
        self._buffers: Dict[str, ParamStore] = {n: ParamStore() for n in compressor.state_buffers}
        self._cstates: Dict[str, CompressorState] = {}
        self._names: Dict[int, str] = {}
        self._order: Dict[str, int] = {}
        self._named = False
        self._plans: Dict[Tuple[int, ...], _BucketPlan] = {}
        self._warmup_cache: Dict[float, Compressor] = {}
        if named_parameters is not None:
            self.attach(named_parameters)

        # Statistics ---------------------------------------------------------------
        self._stats = _Stats()

    # Setup ---------------------------------------------------------------------------

    def attach(self, named_parameters: Iterable[Tuple[str, torch.nn.Parameter]]) -> "SparseHookState":
        """Key state by these names (``model.named_parameters()``; for a DDP model the
        names of ``ddp.module``)."""
        pairs = list(named_parameters)
        if not pairs or not all(isinstance(n, str) and isinstance(p, torch.Tensor) for n, p in pairs):
            raise ValueError(
                "Expected argument `named_parameters` to be (name, parameter) pairs, "
                "usually produced by `model.named_parameters()`."
            )
        self._names = {id(p): n for n, p in pairs}
        # DDP fills its first buckets in reverse registration order; use it as canonical.
        self._order = {n: -i for i, (n, _) in enumerate(pairs)}
        self._named = True
        self._plans.clear()
        return self

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            self._backend = TorchDistBackend(self.process_group)
        return self._backend

    # Pickling (as PowerSGDState): drop the process group and backend ---------------

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        for transient in ("process_group", "_backend", "_plans", "_names", "_warmup_cache"):
            state.pop(transient)
        state["_cstates"] = {k: dataclasses.replace(s, scratch={}) for k, s in self._cstates.items()}
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.process_group = None
        self._backend = None
        self._plans = {}
        self._names = {}
        self._warmup_cache = {}
        logger.info("SparseHookState unpickled: it will use the default process group")

    # Checkpointing ----------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Residuals, compressor state, step and statistics; tensors and plain values only,
        so ``torch.load(..., weights_only=True)`` reads it."""
        return {
            "format": _STATE_FORMAT,
            "compressor": self.compressor.name,
            "step": self.step,
            "error_feedback": self.error_feedback.state_dict(),
            "compressor_buffers": {k: store.state_dict() for k, store in self._buffers.items()},
            "compressor_scalars": {k: dict(s.scalars) for k, s in self._cstates.items()},
            "stats": dataclasses.asdict(self._stats),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(
                f"not a SparseHookState state_dict (expected format {_STATE_FORMAT!r}, "
                f"got {state.get('format') if isinstance(state, dict) else type(state).__name__!r})"
            )
        if state["compressor"] != self.compressor.name:
            raise ValueError(
                f"state_dict was saved with compressor {state['compressor']!r}, "
                f"this state uses {self.compressor.name!r}"
            )
        self.step = int(state["step"])
        self.error_feedback.load_state_dict(state["error_feedback"])
        for name, store in self._buffers.items():
            store.load_state_dict(state["compressor_buffers"].get(name, {}))
        self._cstates = {
            k: CompressorState(key=k, scalars={n: float(v) for n, v in scalars.items()})
            for k, scalars in state["compressor_scalars"].items()
        }
        self._stats = _Stats(**state["stats"])
        self._plans.clear()

    # Statistics ---------------------------------------------------------------------

    def stats(self) -> Dict[str, float]:
        """Cumulative communication statistics of this rank."""
        s = self._stats
        return {
            "steps": s.steps,
            "bytes_sent": s.bytes_sent,
            "bytes_received": s.bytes_received,
            "control_bytes": s.control_bytes,
            "messages": s.messages,
            "dense_bytes": s.dense_bytes,
            "compression_ratio": (s.dense_bytes / s.bytes_sent) if s.bytes_sent else math.inf,
            "density": (s.selected / s.compressible) if s.compressible else 1.0,
            "nonfinite_buckets": s.nonfinite_buckets,
            "compress_s": s.compress_s,
            "communicate_s": s.communicate_s,
            "decompress_s": s.decompress_s,
            "residual_norm": self.error_feedback.residuals.norm(),
        }

    # Internals used by the hook -------------------------------------------------------

    def _name_of(self, param: torch.Tensor) -> str:
        name = self._names.get(id(param))
        if name is None:
            if self._named:
                raise ValueError(
                    "the hook got a parameter that is not among the named parameters the "
                    "state was attached to; attach the DDP module's named_parameters()"
                )
            if (
                self.error_feedback.names()
                and not self._names
                and any(not n.startswith("param") for n in self.error_feedback.names())
            ):
                raise ValueError(
                    "this state holds residuals keyed by parameter name (restored from a "
                    "checkpoint); call state.attach(model.named_parameters()) before training "
                    "(register_sparse_hook does this)"
                )
            name = f"param{len(self._names)}"
            self._names[id(param)] = name
            self._order[name] = len(self._order)
        return name

    def _plan(self, bucket: dist.GradBucket) -> _BucketPlan:
        params = bucket.parameters()
        signature = tuple(id(p) for p in params)
        plan = self._plans.get(signature)
        if plan is not None:
            return plan
        entries = []
        small = []
        offset = 0
        for p in params:
            n = p.numel()
            if n >= self.min_compress_numel:
                entries.append((self._name_of(p), n, offset))
            else:
                small.append((offset, n))
            offset += n
        entries.sort(key=lambda e: self._order[e[0]])
        offsets = [e[2] for e in entries]
        contiguous = all(offsets[i + 1] == offsets[i] + entries[i][1] for i in range(len(entries) - 1))
        plan = _BucketPlan(
            layout=tuple((name, n) for name, n, _ in entries),
            offsets=offsets,
            region_start=offsets[0] if entries and contiguous else None,
            small=small,
            key="|".join(name for name, _, _ in entries),
        )
        self._plans[signature] = plan
        return plan

    def _cstate(self, key: str, layout: Layout, like: torch.Tensor) -> CompressorState:
        cstate = self._cstates.get(key)
        if cstate is None:
            cstate = self._cstates[key] = CompressorState(key=key)
        cstate.step = self.step
        cstate.buffers = {name: store.flat(layout, like) for name, store in self._buffers.items()}
        return cstate

    def _current_compressor(self) -> Compressor:
        warm = self.step - self.start_step
        if not self.density_warmup_steps or warm >= self.density_warmup_steps:
            return self.compressor
        target = float(self.compressor.density)  # type: ignore[attr-defined]
        start = max(self.warmup_initial_density, target)
        density = start * (target / start) ** (warm / self.density_warmup_steps)
        density = float(f"{density:.6g}")
        if density not in self._warmup_cache:
            self._warmup_cache[density] = dataclasses.replace(self.compressor, density=density)  # type: ignore[call-arg]
        return self._warmup_cache[density]

    def _prefers_dense(self, plan: _BucketPlan, numel: int, like: torch.Tensor) -> bool:
        """Ask the collective whether this bucket should skip selection and go dense.
        Only shared numbers go in (never this rank's own count), so every rank agrees."""
        compressor = self._current_compressor()
        if compressor.density_based:
            expected: Optional[float] = k_for_density(compressor.density, numel)  # type: ignore[attr-defined]
        else:
            expected = plan.context.get("mean_count")
        if expected is None:
            return False
        return self.collective.prefers_dense(
            self.backend, numel, int(expected), like.element_size(), compressor.selection_passes
        )

    def _grad_scale(self) -> float:
        if self.grad_scaler is None or not self.grad_scaler.is_enabled():
            return 1.0
        return float(self.grad_scaler.get_scale())

    def _compress(
        self, region: torch.Tensor, plan: _BucketPlan, active: Optional[torch.Tensor] = None
    ) -> SparsePayload:
        """Select over ``region`` (the bucket's compressed parameters, or with masks only
        their ``active`` coordinates)."""
        compressor = self._current_compressor()
        layout = plan.layout if active is None else plan.active_layout
        if self.scope == "bucket" or len(layout) <= 1:
            cstate = self._cstate(plan.key, layout, region)
            return compressor.compress(region, cstate)
        indices, values = [], []
        offset = 0
        for name, n in layout:
            piece = region[offset : offset + n]
            payload = compressor.compress(piece, self._cstate(name, ((name, n),), piece))
            indices.append(payload.indices.long() + offset)
            values.append(payload.values)
            offset += n
        numel = region.numel()
        return SparsePayload(torch.cat(indices).to(index_dtype_for(numel)), torch.cat(values), numel)

    def _active(self, plan: _BucketPlan, like: torch.Tensor) -> Optional[torch.Tensor]:
        """Indices of the region's unmasked coordinates (None when nothing in it is masked),
        cached until the masks change."""
        masker = self.masker
        assert masker is not None
        if plan.mask_version != masker.version:
            names = [n for n, _ in plan.layout]
            mask = masker.flat_mask(names, [k for _, k in plan.layout], like.device)
            plan.mask_flat = mask.to(like.dtype)
            plan.active = None if bool(mask.all()) else torch.nonzero(mask).squeeze(1)
            counts = [int(masker.masks[n].sum()) if n in masker.masks else k for n, k in plan.layout]
            plan.active_layout = tuple((n, c) for (n, _), c in zip(plan.layout, counts))
            plan.mask_version = masker.version
        return plan.active

    def _observe(self, region: torch.Tensor, plan: _BucketPlan) -> None:
        if not self._buffers:
            return
        if self.scope == "bucket" or len(plan.layout) <= 1:
            self.compressor.observe(region, self._cstate(plan.key, plan.layout, region))
            return
        offset = 0
        for name, n in plan.layout:
            piece = region[offset : offset + n]
            self.compressor.observe(piece, self._cstate(name, ((name, n),), piece))
            offset += n

    def _account(self, before: Dict[str, int], bucket_numel: int, itemsize: int) -> None:
        after = self.backend.stats.as_dict()
        s = self._stats
        s.bytes_sent += after["bytes_sent"] - before["bytes_sent"]
        s.bytes_received += after["bytes_received"] - before["bytes_received"]
        s.control_bytes += after["control_bytes"] - before["control_bytes"]
        s.messages += after["messages"] - before["messages"]
        p = self.backend.size
        s.dense_bytes += 2 * (p - 1) * bucket_numel * itemsize // p

    def _finish_step(self, bucket: dist.GradBucket) -> None:
        if not bucket.is_last():
            return
        self.step += 1
        self._stats.steps += 1
        if self.log_every and self.step % self.log_every == 0 and self.backend.rank == 0:
            st = self.stats()
            logger.info(
                "step %d: sent %.3g MB (dense %.3g MB, ratio %.1fx), density %.4g, "
                "compress %.2fs, communicate %.2fs, decompress %.2fs",
                st["steps"],
                st["bytes_sent"] / 1e6,
                st["dense_bytes"] / 1e6,
                st["compression_ratio"],
                st["density"],
                st["compress_s"],
                st["communicate_s"],
                st["decompress_s"],
            )


def _is_finite(tensor: torch.Tensor) -> bool:
    """One read pass and no temporary: NaN propagates to both the minimum and the maximum,
    and +-inf shows up as one of them. (A float64-accumulated sum costs 20x more here, and
    ``isfinite(x).all()`` allocates a mask as large as the tensor.)"""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def _empty_payload(numel: int, like: torch.Tensor) -> SparsePayload:
    return SparsePayload(
        torch.empty(0, dtype=index_dtype_for(numel), device=like.device),
        torch.empty(0, dtype=like.dtype, device=like.device),
        numel,
    )


def _gather_region(buffer: torch.Tensor, plan: _BucketPlan) -> torch.Tensor:
    """The compressed parameters of the bucket, in canonical order: a view of the bucket
    when they lie there contiguously, else a copy into the plan's workspace."""
    if plan.region_start is not None:
        return buffer[plan.region_start : plan.region_start + plan.numel]
    if plan.workspace is None or plan.workspace.dtype != buffer.dtype:
        plan.workspace = torch.empty(plan.numel, dtype=buffer.dtype, device=buffer.device)
    pos = 0
    for (_, n), off in zip(plan.layout, plan.offsets):
        plan.workspace[pos : pos + n].copy_(buffer[off : off + n])
        pos += n
    return plan.workspace


def _scatter_region(buffer: torch.Tensor, plan: _BucketPlan, region: torch.Tensor) -> None:
    if plan.region_start is not None:
        return
    pos = 0
    for (_, n), off in zip(plan.layout, plan.offsets):
        buffer[off : off + n].copy_(region[pos : pos + n])
        pos += n


def sparse_allreduce_hook(state: SparseHookState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: sum sparse payloads across ranks and average.

    Register with ``ddp.register_comm_hook(state, sparse_allreduce_hook)``.
    """
    buffer = bucket.buffer()
    backend = state.backend
    world = backend.size
    before = backend.stats.as_dict()
    start = time.perf_counter()
    plan = state._plan(bucket)

    if state.step < state.start_step:
        fut = allreduce_dense(buffer, backend, plan.context)
        state._account(before, buffer.numel(), buffer.element_size())
        state._finish_step(bucket)
        return fut.then(lambda f: f.value().div_(world))

    region = _gather_region(buffer, plan)
    numel = region.numel()
    # Weight masks: select and send among active coordinates only (masks are the same on
    # every rank, so no indices travel), except on RigL regrowth steps, which need the
    # dense gradient of masked weights: then the whole region goes dense.
    masker = state.masker
    regrowth = masker is not None and masker.needs_dense_gradients()
    active = state._active(plan, buffer) if masker is not None and not regrowth else None
    work_numel = numel if active is None else active.numel()
    # The same decision on every rank: it depends only on shared numbers.
    go_dense = work_numel > 0 and (regrowth or state._prefers_dense(plan, work_numel, buffer))
    if active is not None and isinstance(state._current_compressor(), NoCompression):
        go_dense = True  # active values only: no index list, no bitmap
    flags = 0
    failure: Optional[BaseException] = None
    new_velocity: Optional[torch.Tensor] = None
    scale = 1.0
    work = region
    payload = _empty_payload(work_numel, buffer)
    # A bucket going dense needs no local check: NaN/inf travel through the sum itself.
    try:
        if not go_dense and not _is_finite(buffer):
            flags |= FLAG_NONFINITE
        elif numel:
            state._observe(region, plan)
            scale = state._grad_scale()
            if state.error_feedback_enabled:
                new_velocity = state.error_feedback.compensate(plan.layout, region, scale)
            if active is not None:
                assert plan.mask_flat is not None
                region.mul_(plan.mask_flat)  # masked coordinates: no gradient, no residual
                work = region[active]
            if not go_dense:
                payload = state._compress(work, plan, active)
    except Exception as exc:  # tell the peers before raising, so that nobody hangs
        flags |= FLAG_ERROR
        failure = exc
    compressed = time.perf_counter()
    state._stats.compress_s += compressed - start

    try:
        if go_dense:
            exchange_headers(backend, payload, flags)  # errors and mismatches, on every rank
            # The transport's own allreduce when it has one: as fast as DDP's dense path.
            native = backend.allreduce_native(work)
            region_fut: torch.futures.Future[Any] = (
                native if native is not None else allreduce_dense(work, backend, plan.context)
            )
        else:
            region_fut = state.collective.reduce(payload, backend, flags=flags, context=plan.context)
    except PeerError:
        if failure is not None:  # this rank is the one that failed: raise its own error
            raise failure from None
        raise
    small = torch.cat([buffer[o : o + n] for o, n in plan.small]) if plan.small else None
    small_fut = allreduce_dense(small, backend, plan.small_context) if small is not None else None
    state._account(before, buffer.numel(), buffer.element_size())
    state._finish_step(bucket)
    futures = [region_fut] + ([small_fut] if small_fut is not None else [])

    def _decompress(_: Any) -> torch.Tensor:
        for fut in futures:
            fut.value()  # re-raise a failed collective (timeout, lost peer) here
        communicated = time.perf_counter()
        state._stats.communicate_s += communicated - compressed
        if go_dense:
            nothing_kept = not state.error_feedback_enabled or state.error_feedback.is_zero(plan.layout)
            # the same bits, so the same verdict, on every rank (skipped when nothing to commit)
            finite = nothing_kept or _is_finite(work)
            if finite and state.error_feedback_enabled:
                state.error_feedback.clear(plan.layout, region, scale)
            state._stats.selected += work_numel
            result = work
        else:
            reduced: Reduced = region_fut.value()
            finite = not reduced.nonfinite
            # Commit error feedback only now: if any rank overflowed, AMP skips this step
            # everywhere, so nothing was sent and the residual must stay as it was. A lossy
            # collective reports which entries made it; the rest stay in the residual.
            kept = reduced.kept if reduced.kept is not None and payload.count else None
            indices = payload.indices if kept is None else payload.indices[kept]
            values = payload.values if kept is None else payload.values[kept]
            if active is not None:  # back from active coordinates to the region
                indices = active[indices.long()].to(payload.indices.dtype)
            if finite and state.error_feedback_enabled and numel:
                state.error_feedback.update(
                    plan.layout, region, SparsePayload(indices, values, numel), scale, new_velocity
                )
            state._stats.selected += int(indices.numel())
            # averaged as it is added: no separate pass to divide by the world size
            result = reduced.write(work if active is None else torch.empty_like(work), scale=1.0 / world)
        state._stats.compressible += work_numel
        state._stats.nonfinite_buckets += int(not finite)
        if go_dense:
            result.div_(world)
        if active is not None:  # masked coordinates get no gradient
            region.zero_().index_copy_(0, active, result)
        _scatter_region(buffer, plan, region)
        if small_fut is not None:
            summed = small_fut.value()
            pos = 0
            for off, n in plan.small:
                buffer[off : off + n].copy_(summed[pos : pos + n]).div_(world)
                pos += n
        state._stats.decompress_s += time.perf_counter() - communicated
        return buffer

    return torch.futures.collect_all(futures).then(_decompress)


def register_sparse_hook(
    ddp: torch.nn.parallel.DistributedDataParallel,
    compressor: Union[str, Compressor] = "topk",
    **options: Any,
) -> SparseHookState:
    """Build a :class:`SparseHookState` and register :func:`sparse_allreduce_hook` on ``ddp``.

    ``options`` takes the compressor's own parameters (``density=``, ``threshold=``, ...)
    and the hook options of :class:`SparseHookState`.
    """
    if not isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
        raise ValueError(
            "Expected argument `ddp` to be a torch.nn.parallel.DistributedDataParallel model, "
            f"but got {type(ddp).__name__}."
        )
    import inspect

    hook_options = set(inspect.signature(SparseHookState.__init__).parameters) - {"self", "compressor"}
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
    ddp.register_comm_hook(state, sparse_allreduce_hook)
    return state
