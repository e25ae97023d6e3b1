"""bench/bench_peers.py: the peers' statistics (nnsight, plain forward hooks + index_add_)
give specext's per-neuron entropy and Gini on the same prompts. Numbers only, no timing."""

import sys
from pathlib import Path

import pytest
import torch

import tiny_models as T
from conftest import assert_close
from specext.kernels import reference
from specext.models import load_model
from specext.probes import load_probe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_peers as bp  # noqa: E402

BATCH = 5  # 12 prompts: the last batch is partial


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    lm = load_model(T.save_tiny("llama", tmp_path_factory.mktemp("peers") / "llama", seed=5), device="cpu")
    probe = load_probe("synthetic", max_concepts=6)  # stratified: one concept per category
    qs = [q for c in probe.concepts for q in [x for x in probe.questions if x.concept == c][:2]]
    return lm, probe, qs


@pytest.fixture(scope="module")
def specext_stats(setup):
    entropy, gini = bp.make_specext(*setup, BATCH)()
    assert entropy.shape == gini.shape == (setup[0].n_layers, setup[0].d_ff)
    assert not gini.isnan().any() and 0 < float(gini.mean()) < 1
    return entropy, gini


def _check(stats, ref, what):
    (h, g), (h_ref, g_ref) = stats, ref
    assert_close(g, g_ref, rtol=1e-5, atol=1e-6, what=f"{what} Gini")
    assert_close(h, h_ref, rtol=1e-5, atol=1e-6, what=f"{what} entropy")


def test_hooks_equal_specext(setup, specext_stats):
    lm = setup[0]
    _check(bp.make_hooks(*setup, BATCH)(), specext_stats, "hooks")
    assert all(not s.module._forward_pre_hooks for s in lm.sites), "hooks left registered"


def test_nnsight_equal_specext(setup, specext_stats):
    pytest.importorskip("nnsight")
    _check(bp.make_nnsight(*setup, BATCH)(), specext_stats, "nnsight")


def test_torch_specialisation_matches_reference():
    # Two concepts per category, one category without prompts (left out, as specext does).
    g = torch.Generator().manual_seed(0)
    sums = torch.rand((8, 3, 37), generator=g) ** 2
    counts = torch.tensor([2.0, 1, 3, 2, 1, 1, 0, 0])
    sums[6:] = 0
    sums[0, 1, 5] = 0
    h, gini = bp.torch_specialisation(sums, counts, [0, 0, 1, 1, 2, 2, 3, 3], 4)
    sd, cd = sums.double(), counts.double()
    mass = torch.stack([(sd[2 * c] + sd[2 * c + 1]) / (cd[2 * c] + cd[2 * c + 1]) for c in range(3)])
    ref = reference.neuron_specialization(mass.reshape(3, -1))
    assert_close(gini, ref.gini.reshape(3, 37), rtol=1e-12, atol=1e-12, what="Gini")
    assert_close(h, ref.entropy.reshape(3, 37), rtol=1e-12, atol=1e-12, what="entropy")


def test_capture_is_the_median_per_batch_over_rounds():
    """capture_ms: per batch the median over rounds of (method - floor), summed, plus the
    median final reduction; a stall in one batch of one round does not move it."""
    r = {"batch_ms": [[10, 20, 30], [11, 21, 31], [500, 22, 29]],  # round 2, batch 0: a stall
         "floor_ms": [[8, 18, 27], [8, 18, 27], [8, 18, 27]],
         "finish_ms": [1.0, 2.0, 3.0]}
    # per batch: median(2, 3, 492) = 3, median(2, 3, 4) = 3, median(3, 4, 2) = 3; finish: 2
    assert bp.capture_ms(r) == 3 + 3 + 3 + 2.0
    assert bp.capture_ms(r, [0, 0, 0]) == 2 + 2 + 3 + 1.0
    lo, hi = bp.h.bootstrap(lambda k: bp.capture_ms(r, k), 3, n=200)
    assert 8.0 <= lo <= bp.capture_ms(r) <= hi


def test_paired_run_times_every_batch_of_both(setup):
    """A timed run of a worker: each batch of the method next to the floor's plain pass of
    the same batch, on another copy of the model, and nothing left registered."""
    lm, probe, qs = setup
    fn = bp.make_hooks(lm, probe, qs, BATCH)
    twin = load_model(lm.path, device="cpu")
    floor = bp.make_forward(twin, probe, qs, BATCH)
    own, base, fin = bp._paired_run(fn, floor, 1, torch.device("cpu"))
    assert len(own) == len(base) == fn.n == 3 and fin >= 0
    assert all(not s.module._forward_pre_hooks for s in lm.sites), "hooks left registered"
