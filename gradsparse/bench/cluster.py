"""An emulated cluster on one machine: one network namespace per rank, each with a veth
pair into a bridge namespace, shaped in both directions with ``tc tbf``.

Addresses come from the benchmarking range 198.18.0.0/15 and exist only inside the
namespaces this module creates; loopback is never shaped, so ranks must talk over the veth
(``GLOO_SOCKET_IFNAME`` and ``MASTER_ADDR`` on rank 0's veth, see :meth:`Cluster.rank_env`).
The kernel here has no netem, so only bandwidth is emulated, not delay or loss.

Every command is an argument list run without a shell, and names and rates are validated
first, so no user input reaches a shell. Needs root (CAP_NET_ADMIN).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Sequence, Tuple

__all__ = ["Cluster", "ClusterError", "parse_rate"]

logger = logging.getLogger(__name__)

NETWORK = ipaddress.ip_network("198.18.0.0/15")  # RFC 2544 benchmarking range
_RATE = re.compile(r"^(\d+(?:\.\d+)?)(kbit|mbit|gbit)$")
_PREFIX = re.compile(r"^[a-z][a-z0-9]{1,7}$")
_UNITS = {"kbit": 1e3, "mbit": 1e6, "gbit": 1e9}
_HZ = 250  # kernel timer frequency assumed for tbf's burst (rate / HZ)


class ClusterError(RuntimeError):
    """The cluster cannot be built or used here."""


def parse_rate(rate: str) -> float:
    """``"1gbit"`` -> 1e9 bits per second."""
    match = _RATE.match(rate) if isinstance(rate, str) else None
    if match is None:
        raise ValueError(f"Expected a link rate like '100mbit' or '1gbit' (kbit, mbit, gbit), but got {rate!r}.")
    bits = float(match.group(1)) * _UNITS[match.group(2)]
    if bits <= 0:
        raise ValueError(f"Expected a positive link rate, but got {rate!r}.")
    return bits


def _run(args: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if check and proc.returncode != 0:
        raise ClusterError(f"{' '.join(args)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


@dataclass(frozen=True)
class Cluster:
    """``ranks`` namespaces ``<prefix>r0..`` plus ``<prefix>br`` holding the bridge."""

    ranks: int
    rate: str = "1gbit"
    prefix: str = "gsb"
    #: (rank, rate) pairs: these ranks' links run at their own rate (a degraded node)
    slow: Tuple[Tuple[int, str], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.ranks, int) or not 1 <= self.ranks <= 250:
            raise ValueError(f"Expected `ranks` to be an int in [1, 250], but got {self.ranks!r}.")
        parse_rate(self.rate)
        for rank, rate in self.slow:
            if not isinstance(rank, int) or not 0 <= rank < self.ranks:
                raise ValueError(f"Expected a slow rank in [0, {self.ranks}), but got {rank!r}.")
            parse_rate(rate)

    def rate_of(self, rank: int) -> str:
        """The rate of rank ``rank``'s link."""
        return dict(self.slow).get(rank, self.rate)
        if not _PREFIX.match(self.prefix):
            raise ValueError(f"Expected `prefix` to be 2-8 lowercase letters or digits, but got {self.prefix!r}.")

    # Names and addresses ------------------------------------------------------------------

    def namespace(self, rank: int) -> str:
        return f"{self.prefix}r{rank}"

    @property
    def bridge_namespace(self) -> str:
        return f"{self.prefix}br"

    def address(self, rank: int) -> str:
        return str(NETWORK.network_address + rank + 1)

    @property
    def interface(self) -> str:
        return "veth0"

    def rank_env(self, rank: int, port: int = 29500) -> Dict[str, str]:
        """What a rank needs to talk over its shaped veth instead of loopback."""
        return {
            "GLOO_SOCKET_IFNAME": self.interface,
            "MASTER_ADDR": self.address(0),
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(self.ranks),
            "LOCAL_RANK": "0",
        }

    def exec_prefix(self, rank: int) -> List[str]:
        """Prefix a command with this to run it inside rank ``rank``'s namespace."""
        return ["ip", "netns", "exec", self.namespace(rank)]

    # Lifecycle ------------------------------------------------------------------------------

    @staticmethod
    def check_privileges() -> None:
        if os.geteuid() != 0:
            raise ClusterError(
                "building the emulated cluster needs root (network namespaces and tc); run as root, "
                "or use --loopback for an unshaped run on 127.0.0.1"
            )
        for tool in ("ip", "tc"):
            if shutil.which(tool) is None:
                raise ClusterError(f"`{tool}` is not installed (Debian: apt-get install iproute2)")

    def up(self) -> None:
        """Create namespaces, veth pairs, the bridge and the shaping. Idempotent: an old
        cluster with the same prefix is torn down first."""
        self.check_privileges()
        self.down()
        try:
            self._build()
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        br = self.bridge_namespace
        _run(["ip", "netns", "add", br])
        _run(["ip", "-n", br, "link", "add", "br0", "type", "bridge"])
        _run(["ip", "-n", br, "link", "set", "br0", "up"])
        for r in range(self.ranks):
            ns, host_end, bridge_end = self.namespace(r), f"{self.prefix}v{r}", f"{self.prefix}b{r}"
            _run(["ip", "netns", "add", ns])
            _run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", bridge_end])
            _run(["ip", "link", "set", host_end, "netns", ns])
            _run(["ip", "link", "set", bridge_end, "netns", br])
            _run(["ip", "-n", ns, "link", "set", host_end, "name", self.interface])
            _run(["ip", "-n", ns, "addr", "add", f"{self.address(r)}/{NETWORK.prefixlen}", "dev", self.interface])
            _run(["ip", "-n", ns, "link", "set", self.interface, "up"])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            _run(["ip", "-n", br, "link", "set", bridge_end, "master", "br0"])
            _run(["ip", "-n", br, "link", "set", bridge_end, "up"])
            # tbf shapes egress only: shape both ends of the pair.
            self._shape(ns, self.interface, self.rate_of(r))
            self._shape(br, bridge_end, self.rate_of(r))
        logger.info("cluster up: %d ranks at %s", self.ranks, self.rate)

    def _shape(self, ns: str, dev: str, rate: str) -> None:
        bits = parse_rate(rate)
        burst = max(int(bits / 8 / _HZ), 64 * 1024)  # at least rate/HZ, or tbf cannot reach the rate
        tbf = ["tbf", "rate", rate, "burst", str(burst), "latency", "100ms"]
        _run(["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *tbf])

    def down(self) -> None:
        """Delete every namespace with this prefix (their veths go with them). Safe to
        call at any time, any number of times."""
        if os.geteuid() != 0:
            return
        listed = _run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
        names = [entry["name"] for entry in json.loads(listed)] if listed else []
        ours = re.compile(rf"^{self.prefix}(r\d+|br)$")
        for name in names:
            if ours.match(name):
                _run(["ip", "netns", "del", name], check=False)

    def status(self) -> List[Dict[str, str]]:
        """One row per rank namespace that exists: address and qdisc."""
        listed = _run(["ip", "-j", "netns", "list"], check=False).stdout.strip()
        names = {entry["name"] for entry in json.loads(listed)} if listed else set()
        rows = []
        for r in range(self.ranks):
            if self.namespace(r) in names:
                qdisc = _run(["tc", "-n", self.namespace(r), "qdisc", "show", "dev", self.interface], check=False)
                rows.append({"namespace": self.namespace(r), "address": self.address(r), "qdisc": qdisc.stdout.strip()})
        return rows

    def set_link(self, rank: int, up: bool) -> None:
        """Cut (``up=False``) or restore rank ``rank``'s link, as an unplugged cable would:
        its veth goes down, and every packet to or from it is lost until it comes back."""
        if not 0 <= rank < self.ranks:
            raise ValueError(f"Expected `rank` in [0, {self.ranks}), but got {rank!r}.")
        _run(["ip", "-n", self.namespace(rank), "link", "set", self.interface, "up" if up else "down"])

    def __enter__(self) -> Cluster:
        self.up()
        return self

    def __exit__(self, *exc: object) -> None:
        self.down()
