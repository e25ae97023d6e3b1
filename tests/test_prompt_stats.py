"""PromptStats runs the kernel's unchecked mode: no host sync per layer, a bad label is never
written, and the batch raises once, naming the label and the layer."""

import pytest
import torch

import tiny_models as T
from conftest import CUDA, assert_equal
from specext import ops
from specext.kernels import ops as ops_module
from specext.models import load_model
from specext.probes import Question
from specext.probes.scoring import EncodedBatch, PromptStats, Scorer

DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA")])]


def _batch(B, S, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    select = torch.rand(B, S, generator=g) < 0.5
    select[:, -1] = True
    z = torch.zeros(B, S, dtype=torch.long, device=device)
    return EncodedBatch(z, torch.ones_like(z), z, select.to(device), torch.full((B,), S, device=device))


def _run(st, acts):
    for layer, m in enumerate(acts):
        st(layer, m)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_label_is_skipped_and_raised_once_per_batch(device, monkeypatch):
    B, S, L, D = 3, 7, 4, 33
    batch = _batch(B, S, device)
    acts = torch.randn(L, B, S, D, generator=torch.Generator().manual_seed(1)).to(device)
    st = PromptStats(L, D)
    st.begin(batch)
    bad_token = 1 * S + int(batch.select[1].nonzero()[0])  # a selected token of prompt 1
    st._labels[bad_token] = B + 4  # a bug in the label builder
    reads = []
    real = ops_module.check_label_errors
    monkeypatch.setattr(ops_module, "check_label_errors", lambda *a, **k: (reads.append(1), real(*a, **k)))
    _run(st, acts)
    assert not reads  # nothing read during the forward pass
    with pytest.raises(ValueError, match=rf"^layer 0: labels\[{bad_token}\] = {B + 4} is out of range for "
                                         rf"num_categories = {B} .*{L} such token\(s\) \(at layer\(s\) 0, 1, 2, 3\)"):
        st.end()
    assert len(reads) == 1
    # Nothing was written for the bad token: the sums are those of the other tokens.
    labels = torch.where(batch.select, torch.arange(B, device=device)[:, None], -1).reshape(-1)
    labels[bad_token] = -1
    weights = (batch.select.float() / batch.select.sum(1, keepdim=True)).reshape(-1)
    for layer in range(L):
        s, c = ops.category_accumulate(acts[layer].reshape(B * S, D), labels, B, weights=weights)
        if device == "cpu":
            assert_equal(st.sums[:, layer, :], s, f"layer {layer} sums")
            assert_equal(st.counts[layer], c, f"layer {layer} counts")
        else:
            torch.testing.assert_close(st.sums[:, layer, :], s, rtol=1e-5, atol=1e-6)
    st.end()  # the record went with the batch: a second end() does not raise again


@pytest.mark.parametrize("device", DEVICES)
def test_clean_batch_matches_checked_kernel(device):
    B, S, L, D = 4, 9, 3, 65
    batch = _batch(B, S, device, seed=2)
    acts = torch.randn(L, B, S, D, generator=torch.Generator().manual_seed(3)).to(device).bfloat16()
    st = PromptStats(L, D)
    st.begin(batch)
    _run(st, acts)
    st.end()
    labels = torch.where(batch.select, torch.arange(B, device=device)[:, None], -1).reshape(-1)
    weights = (batch.select.float() / batch.select.sum(1, keepdim=True)).reshape(-1)
    for layer in range(L):
        s, _ = ops.category_accumulate(acts[layer].reshape(B * S, D), labels, B, weights=weights)
        if device == "cpu":
            assert_equal(st.sums[:, layer, :], s, f"layer {layer}")
        else:
            torch.testing.assert_close(st.sums[:, layer, :], s, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="no CUDA")
def test_forward_hooks_do_not_synchronise():
    B, S, L, D = 4, 9, 3, 65
    batch = _batch(B, S, "cuda", seed=2)
    acts = torch.randn(L, B, S, D, device="cuda").bfloat16()
    st = PromptStats(L, D)
    st.begin(batch)
    st(0, acts[0])  # warm-up: the op's first call loads torch._dynamo
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for layer in range(1, L):
            st(layer, acts[layer])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    st.end()


def test_scorer_raises_for_a_bad_label(tmp_path):
    class BadLabels(PromptStats):
        def begin(self, batch):
            super().begin(batch)
            self._labels[self._labels.argmax()] = 99

    lm = load_model(T.save_tiny("llama", tmp_path / "llama", seed=3), device="cpu")
    qs = [Question("Aldoria", "country", "What is the capital of Aldoria?", ("Velmora", "Paris"), 0),
          Question("Gold", "element", "Which element has the symbol Au?", ("Gold", "Tallinn"), 0)]
    with pytest.raises(ValueError, match=r"^layer 0: labels\[\d+\] = 99 is out of range for num_categories = 2"):
        Scorer(lm, open_ended=False).score(qs, stats=BadLabels(lm.n_layers, lm.d_ff))
    st = PromptStats(lm.n_layers, lm.d_ff)
    Scorer(lm, open_ended=False).score(qs, stats=st)  # the same batch with its own labels is fine
    assert st.sums.abs().sum() > 0
