"""Spawn real gloo ranks that meet through a file store, and collect their results."""

from __future__ import annotations

import datetime
import ipaddress
import os
import pickle
import subprocess
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Set

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = [
    "check_on_ranks",
    "descendants",
    "flat_params",
    "gather_all",
    "local_addresses",
    "run_distributed",
    "socket_inodes",
    "watch_sockets",
]


def _entry(rank: int, fn: Callable[..., Any], world_size: int, workdir: str, args: tuple, timeout: float) -> None:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group(
        "gloo",
        init_method=f"file://{workdir}/rendezvous",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        result: Any = ("ok", fn(rank, world_size, *args))
    except BaseException as exc:  # report to the parent with the traceback
        result = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(os.path.join(workdir, f"result{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)
    # The result is safe on disk. Skip interpreter teardown: a DDP model that still holds
    # a Python comm hook's futures when the interpreter finalises can abort the process
    # ("terminate called without an active exception"); see README, "Shutting down".
    os._exit(0)


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0, allow_dead: bool = False
) -> List[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned gloo ranks (process
    group timeout ``timeout`` seconds) and return each rank's result; re-raise the first
    rank's error with its traceback. With ``allow_dead``, return ``(status, value)`` per
    rank, where a rank that died without a result gives ``("dead", None)``."""
    with tempfile.TemporaryDirectory() as workdir:
        context = mp.start_processes(
            _entry,
            args=(fn, world_size, workdir, args, timeout),
            nprocs=world_size,
            start_method="spawn",
            join=False,
        )
        for process in context.processes:
            process.join(timeout + 120)
            if process.is_alive():
                process.kill()
        results = []
        for rank in range(world_size):
            path = os.path.join(workdir, f"result{rank}.pkl")
            if os.path.exists(path):
                with open(path, "rb") as fh:
                    results.append(pickle.load(fh))
            elif allow_dead:
                results.append(("dead", None))
            else:
                code = context.processes[rank].exitcode
                raise AssertionError(f"rank {rank} died without a result (exit code {code})")
    if allow_dead:
        return results
    errors = [f"rank {r}: {msg}" for r, (status, msg) in enumerate(results) if status == "error"]
    if errors:
        raise AssertionError("\n".join(errors))
    return [value for _, value in results]


def check_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120.0) -> None:
    """Run ``fn(rank, world_size, *args)`` on spawned gloo ranks where the checks live: each
    rank asserts against references it computes itself (a dense reference, its peers'
    gathered tensors), and the first rank's failed assert is raised here with its
    traceback. The workers return nothing; anything else is refused, so that no test
    mistakes a returned value for a check."""
    results = run_distributed(fn, world_size, *args, timeout=timeout)
    returned = [r for r in results if r is not None]
    if returned:
        raise AssertionError(f"{fn.__name__} returned {returned[0]!r}; workers under check_on_ranks return nothing")


def flat_params(module: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1).clone() for p in module.parameters()])


def gather_all(tensor: torch.Tensor) -> List[torch.Tensor]:
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(out, tensor.contiguous())
    return out


def descendants(root: int, marker: bytes = b"", *, children_only: bool = False) -> List[int]:
    """Processes below ``root`` (its children only, if asked) whose command line contains
    ``marker``, in pid order, from /proc."""
    parents: Dict[int, int] = {}
    cmdlines: Dict[int, bytes] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        pid = int(stat.parent.name)
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (stat.parent / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):  # it ended meanwhile
            continue
        parents[pid], cmdlines[pid] = ppid, cmdline
    found: List[int] = []
    frontier = [root]
    while frontier:
        parent = frontier.pop()
        kids = [p for p, pp in parents.items() if pp == parent]
        found += kids
        if not children_only:
            frontier += kids
    return sorted(p for p in found if marker in cmdlines[p])


def socket_inodes(pid: int) -> Set[str]:
    inodes = set()
    try:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    except OSError:  # the process ended meanwhile
        pass
    return inodes


def local_addresses(pid: str = "self") -> Dict[str, str]:
    """inode -> local IP of every TCP socket in the network namespace of ``pid``."""
    out = {}
    for table, width in ((f"/proc/{pid}/net/tcp", 8), (f"/proc/{pid}/net/tcp6", 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:  # the process ended meanwhile
            continue
        for line in lines:
            fields = line.split()
            raw = bytes.fromhex(fields[1].split(":")[0])
            # the kernel prints each 32-bit word in host (little-endian) order
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addr = ipaddress.ip_address(words) if width == 8 else ipaddress.IPv6Address(words)
            if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
                addr = addr.ipv4_mapped
            out[fields[9]] = str(addr)
    return out


def watch_sockets(proc: subprocess.Popen, seen: Dict[str, str], until: Callable[[], bool] = lambda: False) -> None:
    """Until ``proc`` ends (or ``until()``), record inode -> local address of every TCP socket
    that ``proc`` or a process below it holds, each read in that process's network namespace."""
    while proc.poll() is None and not until():
        for pid in [proc.pid, *descendants(proc.pid)]:
            addresses = local_addresses(str(pid))
            seen.update({i: addresses[i] for i in socket_inodes(pid) if i in addresses})
        time.sleep(0.05)
