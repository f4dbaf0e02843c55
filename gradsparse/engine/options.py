"""The validated options of the sparse hook."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Set

from gradsparse.checks import check_choice, check_density, check_int, check_probability
from gradsparse.compressors import Compressor, available, registry
from gradsparse.masking import WeightMasker

__all__ = ["SCOPES", "HookOptions"]

#: ``bucket``: select over a bucket's compressed parameters at once; ``layer``: per parameter
SCOPES = ("bucket", "layer")


@dataclass(frozen=True, kw_only=True)
class HookOptions:
    """Everything that configures the hook besides the objects it is handed (compressor,
    collective, backend, masker, grad scaler). Keyword arguments only; validated at
    construction.

    Attributes:
        error_feedback: keep what is not sent and add it to the next gradient.
        momentum: DGC momentum correction factor (0 disables it).
        min_compress_numel: parameters with fewer entries are sent dense.
        start_step: the dense steps: before this step every bucket goes dense.
        density_warmup_steps: the density ramp: over this many steps after ``start_step``
            the density falls exponentially from ``warmup_initial_density`` to the
            compressor's own, as in DGC.
        warmup_initial_density: where the density ramp starts.
        sign_warmup_steps: the sign warm-up: over this many steps after ``start_step``, a
            density-based compressor's buckets go as the ``sign`` compressor sends them
            (every coordinate as one bit, a scale per block of 256, error feedback for the
            rest: about 1.06 bits per coordinate) before the compressor takes over; a density
            ramp follows it. :class:`gradsparse.optim.SparseAdamW` sets it (docs/optimizers.md).
        scope: ``"bucket"`` or ``"layer"`` (see :data:`SCOPES`).
        log_every: a one-line summary on rank 0 every this many steps (0: never).
        sync_free: the sync-free device route (:mod:`gradsparse.engine.routes.device`):
            ``None`` (default) takes it for CUDA gradients whenever the compressor and the
            collective allow (``topk``, ``sampled_topk``, ``randomk`` over ``allgather`` or
            ``shared_topk``); ``True`` takes it on any device (and refuses what it cannot
            carry); ``False`` never.
    """

    error_feedback: bool = True
    momentum: float = 0.0
    min_compress_numel: int = 1024
    start_step: int = 0
    density_warmup_steps: int = 0
    warmup_initial_density: float = 0.25
    sign_warmup_steps: int = 0
    scope: str = "bucket"
    log_every: int = 0
    sync_free: Optional[bool] = None

    def __post_init__(self) -> None:
        if not isinstance(self.error_feedback, bool):
            raise ValueError(f"Expected argument `error_feedback` to be a bool, but got {self.error_feedback!r}.")
        check_probability("momentum", self.momentum)
        if self.momentum and not self.error_feedback:
            raise ValueError("Argument `momentum` (DGC momentum correction) needs `error_feedback=True`.")
        check_int("min_compress_numel", self.min_compress_numel)
        check_int("start_step", self.start_step)
        check_int("density_warmup_steps", self.density_warmup_steps)
        check_density("warmup_initial_density", self.warmup_initial_density)
        check_int("sign_warmup_steps", self.sign_warmup_steps)
        check_choice("scope", self.scope, SCOPES)
        check_int("log_every", self.log_every)
        if self.sync_free is not None and not isinstance(self.sync_free, bool):
            raise ValueError(f"Expected argument `sync_free` to be True, False or None, but got {self.sync_free!r}.")

    @classmethod
    def names(cls) -> Set[str]:
        return {f.name for f in dataclasses.fields(cls)}

    def warmed_up(self, start_step: int, ramp: int, compressor: Compressor, signs: int = 0) -> HookOptions:
        """These options with the dense steps (``start_step``), the density ramp
        (``density_warmup_steps``) and the sign warm-up (``sign_warmup_steps``, both for a
        density-based ``compressor``) raised to at least these (SparseAdamW's warm-up); the
        same object where none moves, so a warm-up step builds one at most."""
        start = max(check_int("start_step", start_step), self.start_step)
        ramp = max(check_int("density_warmup_steps", ramp), self.density_warmup_steps)
        signs = max(check_int("sign_warmup_steps", signs), self.sign_warmup_steps)
        if (start, ramp, signs) == (self.start_step, self.density_warmup_steps, self.sign_warmup_steps):
            return self
        options = dataclasses.replace(self, start_step=start, density_warmup_steps=ramp, sign_warmup_steps=signs)
        options.check_against(compressor, None)
        return options

    def check_against(self, compressor: Compressor, masker: Optional[WeightMasker]) -> None:
        """Refuse combinations of these options with a compressor and a masker that cannot work."""
        for name in ("density_warmup_steps", "sign_warmup_steps"):
            if getattr(self, name) and not compressor.density_based:
                ramped = [n for n in available() if registry.get(n).density_based]
                raise ValueError(
                    f"Argument `{name}` needs a density-based compressor ({', '.join(ramped)}), "
                    f"but the compressor is {compressor.name!r}."
                )
        if self.sign_warmup_steps and self.momentum:
            raise ValueError(
                f"Argument `sign_warmup_steps` needs `momentum=0`, but got momentum {self.momentum}: the sign "
                "warm-up sends every coordinate, and DGC's momentum correction clears what was sent."
            )
        if masker is not None and compressor.state_buffers:
            stateless = [n for n in available() if not registry.get(n).state_buffers]
            raise ValueError(
                f"the {compressor.name!r} compressor keeps per-coordinate state, which weight masks "
                f"would reshape; use one of {stateless} with a masker"
            )
