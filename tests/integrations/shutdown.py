"""The end of a training script under torchrun, without the teardown abort.

The last collective's work can still be held by a gloo worker thread when the script's
``main`` returns. If that thread releases it (which takes the GIL, to drop the Python
tensors) after the interpreter has begun to finalize, the thread is killed inside C++ and
the process aborts ("terminate called without an active exception"; seen in 2 of 8
Trainer runs under gdb: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllgatherWork`` ->
``decref_pyobject`` -> ``take_gil`` during ``Py_FinalizeEx``). A barrier queues behind that
work, and a short sleep hands the GIL to the worker; then the group is destroyed. See
README, "Shutting down"."""

import time
from typing import Callable, Optional

import torch.distributed as dist

__all__ = ["drain", "shut_down"]


def drain() -> None:
    """Let the gloo workers release the works queued so far (for where the group must stay)."""
    dist.barrier()
    time.sleep(0.2)


def shut_down(destroy: Optional[Callable[[], None]] = None) -> None:
    """Drain, then destroy the process group (``destroy``: a framework's own way to)."""
    drain()
    (destroy or dist.destroy_process_group)()
