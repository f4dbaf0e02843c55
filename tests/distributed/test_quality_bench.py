"""gradsparse-bench quality's code path, briefly, on real gloo ranks: the text loads, dense
and sparse runs train, replicas are checked, bytes are counted, the table compares."""

from __future__ import annotations

import math

import pytest
import torch

from gradsparse.bench.quality import QualityRun, load_text, quality_table, run_quality


@pytest.fixture(scope="module")
def text() -> str:
    full = load_text()
    assert len(full) > 4_000_000 and len(set(full)) < 80  # the whole King James text
    return full[:300_000]


def test_quality_runs_dense_and_sparse_and_compares_them(text):
    rows = [
        run_quality(QualityRun("adamw", "dense", 6, 4, eval_batches=2), 2, text),
        run_quality(QualityRun("sparse_adamw", "topk:0.01+dense_steps=2+sign_steps=4", 12, 4, eval_batches=2), 2, text),
        run_quality(QualityRun("sparse_adamw", "topk:0.001+dense_steps=1", 12, 4, eval_batches=2), 2, text),
    ]
    for row in rows:
        assert row["identical"] and math.isfinite(row["val_loss"])
    dense, sparse, lower = rows
    # SparseAdamW's warm-up: sent dense, then as signs (6 times the dense steps unless set), then top-k
    assert (sparse["dense_steps"], sparse["sign_steps"], sparse["ramp_steps"]) == (2, 4, 0)
    assert (lower["dense_steps"], lower["sign_steps"], lower["ramp_steps"]) == (1, 6, 0)
    assert sparse["bytes_after_warmup"] < 0.1 * dense["bytes_per_step"] < sparse["bytes_per_step"]
    assert lower["bytes_after_warmup"] < sparse["bytes_after_warmup"]
    assert f"| 1 + 6 signs, {lower['bytes_after_warmup'] / 1e3:.1f} kB |" in quality_table(rows)
    other_seed = {**sparse, "seed": 1, "val_loss": sparse["val_loss"] + 0.1}  # the table's grouping of seeds
    table = quality_table([*rows, other_seed])
    mean = sparse["val_loss"] + 0.05
    assert f"| sparse_adamw | topk:0.01+dense_steps=2+sign_steps=4 | {mean:.3f} ± " in table and "identical" in table
    assert f"| 2 + 4 signs, {sparse['bytes_after_warmup'] / 1e3:.1f} kB |" in table
    assert "| 61 + 122 ramp, 91.9 kB |" in quality_table(
        [{**sparse, "dense_steps": 61, "sign_steps": 0, "ramp_steps": 122, "bytes_after_warmup": 91.9e3}]
    )
    with pytest.raises(ValueError, match=r"COMPRESSOR\[:DENSITY"):
        QualityRun("adamw", "topk:0.1:allgather:x", steps=1, batch=1).hook()
    options = QualityRun("sparse_adamw", "topk+dense_steps=3+sign_steps=5", steps=1, batch=1).optimizer_options()
    assert options == {"dense_steps": 3, "sign_steps": 5}
    assert QualityRun("sparse_adamw", "sign+block=256", steps=1, batch=1).hook() == {
        "compressor": "sign",
        "collective": None,
        "block": 256,
    }


def test_quality_trains_the_gpt2_layout_on_bpe_tokens(text):
    from gradsparse.bench.models import parameter_count
    from gradsparse.bench.quality import TEXT_MODELS
    from gradsparse.train.text import encode_bpe

    ids, vocab = encode_bpe(text)
    again, _ = encode_bpe(text)
    assert vocab == 16384 and torch.equal(ids, again)  # the layout's embedding; the same tokens every time
    assert int(ids.max()) < vocab and 3 < len(text) / ids.numel() < 6  # a few characters per token
    run = QualityRun("sparse_adamw", "topk:0.01+sign_steps=1", 3, 1, eval_batches=1, lr_warmup=0.5, model="gpt2")
    assert run.learning_rate() == (6e-4, 0.1)  # GPT-2's peak learning rate
    sgd = QualityRun("sgd", "dense", 1, 1)
    assert QualityRun("sgd", "dense", 1, 1, model="gpt2").learning_rate() == sgd.learning_rate()  # SGD's own
    row = run_quality(run, 2, text, (ids, vocab))
    assert row["identical"] and math.isfinite(row["val_loss"]) and row["model"] == "gpt2"
    dense_bytes = 2 * 0.5 * 4 * parameter_count("gpt2")  # a ring allreduce's, per rank
    assert row["bytes_after_warmup"] < 0.03 * dense_bytes
    assert "val loss (nats/token)" in quality_table([row])
    assert sum(p.numel() for p in TEXT_MODELS["gpt2"][1](vocab).parameters()) == parameter_count("gpt2")
