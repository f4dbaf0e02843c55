"""gradsparse-bench quality's code path, briefly, on real gloo ranks: the text loads, dense
and sparse runs train, replicas are checked, bytes are counted, the table compares."""

from __future__ import annotations

import math

import pytest

from gradsparse.bench.quality import QualityRun, load_text, quality_table, run_quality


@pytest.fixture(scope="module")
def text() -> str:
    full = load_text()
    assert len(full) > 4_000_000 and len(set(full)) < 80  # the whole King James text
    return full[:300_000]


def test_quality_runs_dense_and_sparse_and_compares_them(text):
    rows = [
        run_quality(QualityRun("adamw", "dense", steps=6, batch=4, eval_batches=2), 2, text),
        run_quality(QualityRun("sparse_adamw", "topk:0.01", steps=6, batch=4, eval_batches=2), 2, text),
    ]
    for row in rows:
        assert row["identical"] and math.isfinite(row["val_loss"])
    dense, sparse = rows
    assert sparse["bytes_per_step"] < 0.1 * dense["bytes_per_step"]
    table = quality_table(rows)
    assert "| sparse_adamw | topk:0.01 |" in table and "identical" in table
    with pytest.raises(ValueError, match=r"COMPRESSOR\[:DENSITY"):
        QualityRun("adamw", "topk:0.1:allgather:x", steps=1, batch=1).hook()
    assert QualityRun("sparse_adamw", "sign+block=256", steps=1, batch=1).hook() == {
        "compressor": "sign",
        "collective": None,
        "block": 256,
    }
