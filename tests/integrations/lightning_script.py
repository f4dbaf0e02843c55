"""A Lightning run on 2 CPU ranks with the SparseGradients callback.

    python lightning_script.py PACKAGE STRATEGY OUT [COLLECTIVE [OPTIMIZER]]
        PACKAGE: lightning | pytorch_lightning; STRATEGY: ddp | ddp_spawn;
        OPTIMIZER: sgd (top-k) | sparse_adamw (sign; SparseAdamW built in configure_optimizers
        without its hook, which the callback attaches)

With ddp_spawn the hook state is built in the parent and pickled into the workers with the
model. Rank 0 writes OUT/result.json; the metrics land in OUT's CSV logs."""

import importlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import gradsparse as gs
from tests.integrations.shutdown import drain, shut_down

PACKAGE, STRATEGY, OUT = sys.argv[1], sys.argv[2], Path(sys.argv[3])
COLLECTIVE = sys.argv[4] if len(sys.argv) > 4 else "allgather"
OPTIMIZER = sys.argv[5] if len(sys.argv) > 5 else "sgd"
COMPRESSOR, OPTIONS = ("sign", {}) if OPTIMIZER == "sparse_adamw" else ("topk", {"density": 0.05})
pl = importlib.import_module("lightning.pytorch" if PACKAGE == "lightning" else "pytorch_lightning")
integration = importlib.import_module(f"gradsparse.integrations.{PACKAGE}")


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        if OPTIMIZER == "sparse_adamw":
            return gs.optim.SparseAdamW(self.parameters(), lr=0.01, betas=(0.9, 0.99), weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Check(pl.Callback):
    """After fit, on every rank: replicas identical and the hook ran; rank 0 reports."""

    def __init__(self, sparse) -> None:
        self.sparse = sparse

    def on_fit_end(self, trainer, pl_module):
        flat = torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()])
        copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(copies, flat)
        assert all(torch.equal(copies[0], c) for c in copies), "replicas diverged"
        stats = self.sparse.state.stats()
        assert stats["steps"] == trainer.global_step, (stats["steps"], trainer.global_step)
        moments = {}
        if OPTIMIZER == "sparse_adamw":  # attached at fit start: the hook took Adam's moments every step
            (opt,) = trainer.optimizers
            pre = self.sparse.state.preconditioner
            assert opt.hook is self.sparse.state and pre is not None
            moments = {"moment_steps": sorted(set(pre.steps.values())), "first_moments": sorted(pre.first_moments)}
        if trainer.global_rank == 0:
            names = sorted(self.sparse.state.feedback.names())
            result = {**stats, **moments, "names": names, "world": dist.get_world_size()}
            (OUT / "result.json").write_text(json.dumps(result))
        del copies, flat
        drain()  # the all_gather's work must be let go before this process ends (tests/integrations/shutdown.py)


def main() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 20, generator=gen)
    data = torch.utils.data.TensorDataset(x, (x[:, :5] * 3).argmax(1))
    model = Tiny()
    if STRATEGY == "ddp_spawn":  # built in the parent, pickled into the workers
        compressor = gs.compressors.build(COMPRESSOR, **OPTIONS)
        state = gs.SparseHookState(
            compressor, named_parameters=model.named_parameters(), min_compress_numel=0, collective=COLLECTIVE
        )
        sparse = integration.SparseGradients(state=state)
    else:
        sparse = integration.SparseGradients(COMPRESSOR, **OPTIONS, min_compress_numel=0, collective=COLLECTIVE)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=STRATEGY,
        max_steps=8,
        log_every_n_steps=2,  # the callback logs at the Trainer's interval
        logger=pl.loggers.CSVLogger(OUT, name="csv"),
        callbacks=[sparse, Check(sparse)],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=16))
    if dist.is_initialized():  # Lightning keeps the group after fit (the "ddp" strategy)
        shut_down()


if __name__ == "__main__":
    main()
