"""A Hugging Face Trainer run on 2 CPU ranks (under torchrun) with one line of gradsparse,
ddp_find_unused_parameters on and a parameter no forward uses. Rank 0 writes argv[1]; argv[3],
if given, is the collective; argv[4], if given, the optimizer: adamw (top-k; the Trainer's
AdamW), sparse_adamw (sign; the Trainer builds SparseAdamW, in the same line) or
sparse_adamw_topk (top-k, SparseAdamW, 64 steps of which the learning rate warms up over 56:
SparseAdamW's warm-up follows the Trainer's schedule)."""

import json
import sys

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from gradsparse.integrations.transformers import sparse_gradients
from tests.integrations.shutdown import shut_down

OPTIMIZER = sys.argv[4] if len(sys.argv) > 4 else "adamw"
TOPK_WARM_UP = OPTIMIZER == "sparse_adamw_topk"


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))
        self.unused = nn.Linear(64, 64)  # never in forward: DDP needs find_unused_parameters

    def forward(self, x, labels=None):
        logits = self.net(x)
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class Logs(TrainerCallback):
    def __init__(self) -> None:
        self.seen = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.seen.append(dict(logs or {}))


def main() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(256, 20, generator=gen)
    data = [{"x": x[i], "labels": int((x[i, :5] * 3).argmax())} for i in range(len(x))]
    args = TrainingArguments(
        output_dir=sys.argv[2],
        per_device_train_batch_size=8,
        max_steps=64 if TOPK_WARM_UP else 8,
        warmup_steps=56 if TOPK_WARM_UP else 0,
        logging_steps=2,
        learning_rate=0.05 if OPTIMIZER == "adamw" else 0.01,
        weight_decay=0.1,
        max_grad_norm=1.0 if OPTIMIZER == "adamw" else 0.0,
        report_to="none",
        use_cpu=True,
        ddp_backend="gloo",
        ddp_find_unused_parameters=True,
        save_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
    )
    logs = Logs()
    model = Tiny()
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[logs])
    collective = sys.argv[3] if len(sys.argv) > 3 else "allgather"
    if OPTIMIZER == "sparse_adamw":
        sparse = sparse_gradients(trainer, "sign", min_compress_numel=0, sparse_adamw=True)
    elif TOPK_WARM_UP:
        sparse = sparse_gradients(trainer, "topk", density=0.05, min_compress_numel=0, sparse_adamw=True)
    else:
        sparse = sparse_gradients(trainer, "topk", density=0.05, min_compress_numel=0, collective=collective)
    trainer.train()
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    copies = [torch.empty_like(flat) for _ in range(dist.get_world_size())]
    dist.all_gather(copies, flat)
    assert all(torch.equal(copies[0], c) for c in copies), "replicas diverged"
    if dist.get_rank() == 0:
        stats = sparse.state.stats()
        history = [h for h in trainer.state.log_history if "gradsparse/bytes_sent" in h]
        seen = [s for s in logs.seen if "gradsparse/bytes_sent" in s]
        feedback = sparse.state.feedback
        idle = sum(float(feedback.residual(n).abs().sum()) for n in feedback.names() if n.startswith("unused."))
        names = sorted(n for n in feedback.names() if not n.startswith("unused."))
        result = {**stats, "history": len(history), "seen": len(seen), "names": names, "idle_residual": idle}
        held = sum(float(feedback.residual(n).abs().sum()) for n in feedback.names())
        options = sparse.state.options
        result.update(start_step=options.start_step, sign_warmup_steps=options.sign_warmup_steps, held=held)
        optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate's wrapper
        result["optimizer"] = type(optimizer).__name__
        if OPTIMIZER == "sparse_adamw":  # built by the Trainer from its arguments, attached at train begin
            pre = sparse.state.preconditioner
            assert optimizer.hook is sparse.state and pre is not None
            decayed = {
                n
                for g in optimizer.param_groups
                if g["weight_decay"]
                for n, p in model.named_parameters()
                if any(p is q for q in g["params"])
            }
            result.update(moment_steps=sorted(set(pre.steps.values())), decayed=sorted(decayed))
        with open(sys.argv[1], "w") as fh:
            json.dump(result, fh)
    del copies, flat
    shut_down()


if __name__ == "__main__":
    main()
