"""Routes: how a bucket travels, one object per route, each owning its stages.

==================  ================================================================
``base``            :class:`BucketStep` (the hand-off between stages), :class:`Route`,
                    the registry and :func:`register_route`
``dense``           ``dense``: the whole region by allreduce (dense steps, cost model)
``sparse``          ``sparse``: every rank selects, the collective sums the payloads
``shared_topk``     ``shared_topk``: one leader per round selects for every rank
``device``          ``device``: fixed-size messages, no host read (GPUs; ``sync_free``)
``sign``            ``sign``: one bit per coordinate (the ``sign`` compressor's route)
==================  ================================================================

The policy (``gradsparse.engine.policy``) picks the route of each bucket. A new route is one
module: a :class:`Route` subclass decorated with ``@register_route("name")``, chosen with
``SparseHookState(route="name")`` (or claimed for a collective by its ``serves``, or for a
compressor by the compressor's ``route``).
"""

from __future__ import annotations

from .dense import DenseRoute
from .device import DeviceRoute
from .route import BucketStep, Route, available, build, for_collective, register_route, registry
from .shared_topk import SharedTopkRoute
from .sign import SignRoute
from .sparse import SparseRoute

__all__ = [
    "BucketStep",
    "DenseRoute",
    "DeviceRoute",
    "Route",
    "SharedTopkRoute",
    "SignRoute",
    "SparseRoute",
    "available",
    "build",
    "for_collective",
    "register_route",
    "registry",
]
