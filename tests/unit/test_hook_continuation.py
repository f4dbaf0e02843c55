"""The hook's continuation when a collective fails while another is still in flight."""

from types import SimpleNamespace

import pytest
import torch

from gradsparse.engine import reduce as hook


def _fail(_: torch.futures.Future) -> None:
    raise RuntimeError("Timed out waiting 15000ms for recv operation to complete")


def test_finish_raises_the_failure_not_an_internal_assert_on_the_pending_future():
    # collect_all completes early when one future fails; the bucket's other sum may still be
    # pending then, and reading it would be torch's "completed() INTERNAL ASSERT FAILED"
    pending, parent = torch.futures.Future(), torch.futures.Future()
    failed = parent.then(_fail)
    collected = torch.futures.collect_all([pending, failed])
    parent.set_result(None)
    assert collected.done() and not pending.done()
    with pytest.raises(RuntimeError, match="Timed out waiting"):
        hook.finish(None, SimpleNamespace(failure=None), [pending, failed], collected)  # type: ignore[arg-type]


def test_finish_raises_this_ranks_own_failure_first():
    parent = torch.futures.Future()
    failed = parent.then(_fail)
    collected = torch.futures.collect_all([failed])
    parent.set_result(None)
    own = ValueError("this rank's compressor failed")
    with pytest.raises(ValueError, match="compressor failed"):
        hook.finish(None, SimpleNamespace(failure=own), [failed], collected)  # type: ignore[arg-type]
