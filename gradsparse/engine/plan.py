"""Where each parameter lies: names by identity, bucket plans (which parameters are
compressed, in which order, and where they sit in the bucket), gathering and scattering
the compressed region, and the cache of weight masks over it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, FrozenSet, List, Optional, Sequence, Set, Tuple

import torch

from gradsparse.buffers import reusable
from gradsparse.checks import check_named_parameters
from gradsparse.masking import WeightMasker, flat_mask
from gradsparse.store import Layout

__all__ = ["NAME_TAG", "BucketPlan", "BucketPlanner", "MaskCache", "ParamNames"]


#: attribute set on each attached parameter: its name travels with it when a model is
#: pickled into spawned workers (``mp.spawn``, Lightning's spawn launcher), where the
#: parameters are other objects than the ones the state was attached to
NAME_TAG = "_gradsparse_name"


class ParamNames:
    """Parameter names by identity, and a canonical order: DDP fills its first buckets
    in reverse registration order, so that order is used for every bucket."""

    def __init__(self) -> None:
        self.by_id: Dict[int, str] = {}
        self.order: Dict[str, int] = {}
        self.attached = False
        #: the attached parameters themselves: pickled in one stream with their model (mp.spawn,
        #: Lightning's spawn launcher), they come out as that model's own parameters
        self.params: List[Tuple[str, torch.Tensor]] = []
        self.served: Set[int] = set()  # ids of the parameters the hook has met
        #: why unnamed parameters must not be numbered (set when restored state has real names)
        self.attach_required: Optional[str] = None

    def attach(self, named_parameters: Any) -> None:
        pairs = check_named_parameters(named_parameters)
        self.by_id = {id(p): n for n, p in pairs}
        self.order = {n: -i for i, (n, _) in enumerate(pairs)}
        self.attached = True
        self.params = pairs
        for name, p in pairs:
            setattr(p, NAME_TAG, name)

    def rebind(self) -> None:
        """After unpickling: the parameters are other objects now; those pickled with the
        state are known by identity again, others by their tags."""
        self.by_id = {id(p): n for n, p in self.params}
        self.served = set()

    def name_of(self, param: torch.Tensor) -> str:
        self.served.add(id(param))
        name = self.by_id.get(id(param))
        if name is not None:
            return name
        if self.attached:
            return self._by_tag(param)
        if self.attach_required is not None:
            raise ValueError(self.attach_required)
        name = f"param{len(self.by_id)}"
        self.by_id[id(param)] = name
        self.order[name] = len(self.order)
        return name

    def _by_tag(self, param: torch.Tensor) -> str:
        """The name a parameter was tagged with, when it is a copy of an attached one (a
        spawned worker's) and the state has not met the original in this process."""
        tag = getattr(param, NAME_TAG, None)
        if tag not in self.order:
            raise ValueError(
                "the hook got a parameter that is not among the named parameters the state was attached "
                f"to (shape {tuple(param.shape)}); attach the DDP module's named_parameters() in this process: "
                "state.attach(ddp.module.named_parameters()), or use gradsparse.register_sparse_hook(ddp, ...)"
            )
        if tag in self.by_id.values() and not self._stale(tag):
            raise ValueError(
                f"this SparseHookState already serves another parameter named {tag!r}: a state belongs to one "
                "DDP model (its residuals are that model's); build one state per model"
            )
        self.by_id = {i: n for i, n in self.by_id.items() if n != tag}
        self.by_id[id(param)] = tag
        return tag

    def _stale(self, name: str) -> bool:
        """Whether the parameter ``name`` is known by has never reached the hook (a pickled
        copy that nobody trains), so that a tagged parameter may take the name over."""
        return all(i not in self.served for i, n in self.by_id.items() if n == name)


@dataclass
class MaskCache:
    """A plan's weight masks: the flat mask of its region and the indices of its active
    coordinates (None when nothing is masked), refreshed when the masker's version moves."""

    version: int = -1
    flat: Optional[torch.Tensor] = None
    active: Optional[torch.Tensor] = None
    layout: Layout = ()

    def refresh(self, masker: WeightMasker, layout: Layout, like: torch.Tensor) -> Optional[torch.Tensor]:
        if self.version != masker.version:
            mask = flat_mask(masker, [n for n, _ in layout], [k for _, k in layout], like.device)
            self.flat = mask.to(like.dtype)
            self.active = None if bool(mask.all()) else torch.nonzero(mask).squeeze(1)
            counts = [int(masker.masks[n].sum()) if n in masker.masks else k for n, k in layout]
            self.layout = tuple((n, c) for (n, _), c in zip(layout, counts))
            self.version = masker.version
        return self.active


@dataclass
class BucketPlan:
    """How one bucket's flat buffer splits into its compressed region and dense parts."""

    layout: Layout  # compressed parameters, canonical order: (name, numel)
    offsets: List[int]  # their offsets in the bucket buffer, same order
    region_start: Optional[int]  # set when they lie contiguous in canonical order
    small: List[Tuple[int, int]]  # (offset, numel) of parameters sent dense
    key: str
    #: (name, offset, numel) of every parameter of the bucket, the small ones included;
    #: filled only when the planner names them all (gradient preconditioning)
    segments: Tuple[Tuple[str, int, int], ...] = ()
    #: names of the bucket's parameters with fewer than two dimensions (biases, norms), when named
    vectors: FrozenSet[str] = frozenset()
    masks: MaskCache = field(default_factory=MaskCache)
    context: Dict[str, Any] = field(default_factory=dict)  # the collective's, never read here
    scratch: Dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return sum(n for _, n in self.layout)

    def gather(self, buffer: torch.Tensor) -> torch.Tensor:
        """The compressed parameters in canonical order: a view of the bucket when they
        lie there contiguously, else a copy into a reused workspace."""
        if self.region_start is not None:
            return buffer[self.region_start : self.region_start + self.numel]
        region = reusable(self.scratch, "region", self.numel, buffer)
        pos = 0
        for (_, n), off in zip(self.layout, self.offsets):
            region[pos : pos + n].copy_(buffer[off : off + n])
            pos += n
        return region

    def pieces(self, buffer: torch.Tensor) -> List[torch.Tensor]:
        """The compressed parameters where they lie in the bucket, in canonical order (views)."""
        return [buffer[off : off + n] for (_, n), off in zip(self.layout, self.offsets)]

    def region_map(self, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """Where the region lies in the bucket, per compressed parameter: (its end in the
        region, what to add to its region positions to place them in the bucket), int64
        on ``device``, made once per plan."""
        key = f"region_shifts:{device}"
        if key not in self.scratch:
            sizes = torch.tensor([n for _, n in self.layout], dtype=torch.int64)
            ends = sizes.cumsum(0)
            shifts = torch.tensor(self.offsets, dtype=torch.int64) - (ends - sizes)
            self.scratch[f"region_ends:{device}"] = ends.to(device)
            self.scratch[key] = shifts.to(device)
        return self.scratch[f"region_ends:{device}"], self.scratch[key]

    def in_bucket(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions in the region (any integer dtype, each in ``[0, numel)``) as int64
        positions in the bucket."""
        ends, shifts = self.region_map(positions.device)
        owners = torch.bucketize(positions, ends, right=True)
        return positions.long() + shifts.index_select(0, owners)

    def scatter(self, buffer: torch.Tensor, region: torch.Tensor) -> None:
        """Write the region back (nothing to do when it is a view of the bucket)."""
        if self.region_start is not None:
            return
        pos = 0
        for (_, n), off in zip(self.layout, self.offsets):
            buffer[off : off + n].copy_(region[pos : pos + n])
            pos += n

    def scan(
        self, buffer: torch.Tensor, *, check_finite: bool, compressed: bool = True
    ) -> Tuple[bool, Tuple[str, ...]]:
        """One read pass over the bucket: whether it is finite (when asked), and which
        compressed parameters received no gradient this step (``compressed=False``: only
        the parameters sent dense are read, for their finiteness). DDP fills the slot of a
        parameter that no backward reached (``find_unused_parameters``, ``static_graph``)
        with zeros; a used parameter whose gradient is exactly zero is treated the same,
        which is just as exact: nothing of it is sent and its residual waits."""
        spans = [(o, n) for (_, n), o in zip(self.layout, self.offsets) if n] if compressed else []
        if check_finite:
            spans += [(o, n) for o, n in self.small if n]
        if not spans:
            return True, ()
        bounds = [torch.aminmax(buffer[o : o + n]) for o, n in spans]
        low = torch.stack([b[0] for b in bounds])
        high = torch.stack([b[1] for b in bounds])
        finite = not check_finite or bool(torch.isfinite(low).all() & torch.isfinite(high).all())
        zero = ((low == 0) & (high == 0)).tolist()
        names = [name for name, n in self.layout if n] if compressed else []
        return finite, tuple(name for name, z in zip(names, zero) if z)

    def small_values(self, buffer: torch.Tensor) -> Optional[torch.Tensor]:
        """The parameters sent dense, concatenated (None when there are none)."""
        if not self.small:
            return None
        return torch.cat([buffer[o : o + n] for o, n in self.small])

    def write_small(self, buffer: torch.Tensor, summed: torch.Tensor, world: int) -> None:
        pos = 0
        for off, n in self.small:
            buffer[off : off + n].copy_(summed[pos : pos + n]).div_(world)
            pos += n


class BucketPlanner:
    """One :class:`BucketPlan` per set of parameters, built on first sight."""

    name_all: bool = False  # the default of planners pickled before the attribute existed

    def __init__(self, names: ParamNames, min_compress_numel: int, name_all: bool = False) -> None:
        self.names = names
        self.min_compress_numel = min_compress_numel
        #: also name the small parameters, into ``BucketPlan.segments``
        self.name_all = name_all
        self.plans: Dict[Tuple[int, ...], BucketPlan] = {}

    def plan(self, params: Sequence[torch.Tensor]) -> BucketPlan:
        signature = tuple(id(p) for p in params)
        plan = self.plans.get(signature)
        if plan is None:
            plan = self.plans[signature] = self._build(params)
        return plan

    def _build(self, params: Sequence[torch.Tensor]) -> BucketPlan:
        entries, small, segments, vectors = [], [], [], set()
        offset = 0
        for p in params:
            n = p.numel()
            if n >= self.min_compress_numel:
                entries.append((self.names.name_of(p), n, offset))
            else:
                small.append((offset, n))
            if self.name_all:
                segments.append((entries[-1][0] if n >= self.min_compress_numel else self.names.name_of(p), offset, n))
                if p.dim() < 2:
                    vectors.add(segments[-1][0])
            offset += n
        entries.sort(key=lambda e: self.names.order[e[0]])
        offsets = [e[2] for e in entries]
        contiguous = all(offsets[i + 1] == offsets[i] + entries[i][1] for i in range(len(entries) - 1))
        return BucketPlan(
            layout=tuple((name, n) for name, n, _ in entries),
            offsets=offsets,
            region_start=offsets[0] if entries and contiguous else None,
            small=small,
            key="|".join(name for name, _, _ in entries),
            segments=tuple(segments),
            vectors=frozenset(vectors),
        )
