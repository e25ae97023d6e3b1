"""The concept-permutation null of per-neuron Gini: centred on 0 and ~1 % above the 99th
percentile when labels carry no signal; a planted specialised neuron is above it; the
leave-one-out standardisation; per-layer category dropping in the neuron table."""

import numpy as np
import pytest
import torch

from specext import ops
from specext.metrics.null_model import permutation_null, studentized
from specext.metrics.specialization import ConceptMass, neuron_table


def _world(K=120, C=6, L=3, D=1500, seed=0, planted=None):
    """Concepts drawn from one distribution (labels carry no signal), each with 1-4 prompts."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.randint(1, 5, (K, L), generator=g).float()
    per_prompt = torch.rand((K, L, D), generator=g) + 0.5
    sums = per_prompt * counts[..., None]
    cat = torch.randperm(K, generator=g) % C  # random category assignment of identical concepts
    if planted is not None:
        l, n, c = planted
        sums[cat == c, l, n] *= 3.0  # neuron (l, n) fires 3x for category c
    return sums, counts, cat.tolist(), C


def _observed(sums, counts, cat, C):
    m = ConceptMass(len(cat), sums.shape[1], sums.shape[2])
    m.sums.copy_(sums)
    m.counts.copy_(counts)
    return neuron_table(m.category_mass(cat, C)).gini


def test_null_is_centred_and_one_percent_above_without_signal():
    shares, excess = [], []
    for seed in range(3):
        sums, counts, cat, C = _world(seed=seed)
        gini = _observed(sums, counts, cat, C)
        res = permutation_null(sums, counts, cat, C, gini, permutations=8, seed=seed)
        assert res.gini_null.shape == gini.shape and torch.isfinite(res.gini_null).all()
        ex = res.excess_gini.double()
        excess.append(float(ex.mean()))
        # centred: the mean excess is small next to the null's own level
        assert abs(float(ex.mean())) < 0.05 * float(res.gini_null.double().mean())
        shares.append(float(res.above_null.double().mean()))
    share = float(np.mean(shares))
    assert 0.004 < share < 0.02, shares  # 1 % expected; 13,500 neurons per seed


def test_planted_specialised_neuron_is_above_its_null():
    sums, counts, cat, C = _world(seed=7, planted=(1, 42, 2))
    gini = _observed(sums, counts, cat, C)
    res = permutation_null(sums, counts, cat, C, gini, permutations=8, seed=0)
    assert bool(res.above_null[1, 42])
    assert float(res.excess_gini[1, 42]) > 0.1


def test_null_is_seeded_and_needs_two_permutations():
    sums, counts, cat, C = _world(K=30, D=50, seed=1)
    gini = _observed(sums, counts, cat, C)
    a = permutation_null(sums, counts, cat, C, gini, permutations=4, seed=3)
    b = permutation_null(sums, counts, cat, C, gini, permutations=4, seed=3)
    assert torch.equal(a.gini_null, b.gini_null) and torch.equal(a.above_null, b.above_null)
    c = permutation_null(sums, counts, cat, C, gini, permutations=4, seed=4)
    assert not torch.equal(a.gini_null, c.gini_null)
    with pytest.raises(ValueError, match="--null-permutations must be 0 \\(off\\) or >= 2"):
        permutation_null(sums, counts, cat, C, gini, permutations=1)


def test_permutation_keeps_category_sizes_and_matches_a_direct_computation():
    sums, counts, cat, C = _world(K=20, L=1, D=30, seed=2)
    gini = _observed(sums, counts, cat, C)
    res = permutation_null(sums, counts, cat, C, gini, permutations=3, seed=5)
    # recompute the same P + 1 = 4 draws by hand
    g = torch.Generator().manual_seed(5 + 0)
    perms = [torch.randperm(20, generator=g) for _ in range(4)]
    lab = torch.tensor(cat)
    draws = []
    for p in perms:
        newlab = lab[p]
        assert sorted(torch.bincount(newlab, minlength=C).tolist()) == sorted(torch.bincount(lab, minlength=C).tolist())
        cs = torch.zeros(C, 30, dtype=torch.float64).index_add_(0, newlab, sums[:, 0].double())
        cc = torch.zeros(C, dtype=torch.float64).index_add_(0, newlab, counts[:, 0].double())
        x = torch.sort(cs / cc[:, None], 0).values
        i = torch.arange(1, C + 1, dtype=torch.float64)[:, None]
        draws.append(((2 * i - C - 1) * x).sum(0) / (C * x.sum(0)))
    torch.testing.assert_close(res.gini_null[0].double(), torch.stack(draws).mean(0), rtol=1e-5, atol=1e-6)


def test_studentized_uses_only_null_draws_as_references():
    obs = torch.tensor([1.0, 5.0, 2.0])
    null = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 3.0], [3.0, 3.0, 2.0], [0.5, 4.0, 2.5]])
    zo, zn = studentized(obs, null)
    P = null.shape[0] - 1
    for n in range(3):
        y = null[:, n].double()
        ref = y[:P]
        assert float(zo[n]) == pytest.approx(float((obs[n] - ref.mean()) / ref.std()), rel=1e-12)
        for i in range(P + 1):
            rest = torch.cat([y[:i], y[i + 1:]])  # the other null draws, never the observed one
            assert float(zn[i, n]) == pytest.approx(float((y[i] - rest.mean()) / rest.std()), rel=1e-12)
    # the observed value does not move the null draws' scores
    _, zn2 = studentized(obs * 100, null)
    assert torch.equal(zn, zn2)
    # zero spread: equal -> 0, different -> inf
    zo, zn = studentized(torch.tensor([1.0, 2.0]), torch.ones(3, 2))
    assert float(zo[0]) == 0.0 and float(zo[1]) == float("inf")
    with pytest.raises(ValueError, match="at least 3 draws"):
        studentized(obs, null[:2])


def test_unspecialised_neurons_stay_near_one_percent_when_most_neurons_are_specialised():
    """The threshold must not fall because other neurons carry signal: with 90 % of the
    neurons planted, the unplanted ones are still above their null ~1 % of the time (a
    reference set that included the observed Gini gave 9 %)."""
    K, C, L, D = 120, 6, 2, 3000
    above, n_null = 0, 0
    for seed in range(3):
        sums, counts, cat, _ = _world(K=K, C=C, L=L, D=D, seed=seed)
        g = torch.Generator().manual_seed(100 + seed)
        planted = torch.rand((L, D), generator=g) < 0.9
        fav = torch.randint(0, C, (L, D), generator=g)  # each planted neuron's category
        boost = torch.ones(K, L, D)
        catt = torch.tensor(cat)
        boost[(catt[:, None, None] == fav[None]) & planted[None]] = 3.0
        sums = sums * boost
        gini = _observed(sums, counts, cat, C)
        res = permutation_null(sums, counts, cat, C, gini, permutations=8, seed=seed)
        assert res.above_null[planted].double().mean() > 0.9  # the planted ones are found
        above += int(res.above_null[~planted].sum())
        n_null += int((~planted).sum())
    share = above / n_null
    assert 0.003 < share < 0.022, (above, n_null)  # 1 % expected over ~1800 null neurons


def test_category_missing_at_some_layers_is_dropped_there_only():
    torch.manual_seed(0)
    C, L, D = 3, 2, 5
    mass = torch.rand(C, L, D) + 0.1
    mass[2, 1] = float("nan")  # category 2 has no usable prompt at layer 1
    usable = torch.tensor([[True, True], [True, True], [True, False]])
    t = neuron_table(mass, usable=usable)
    assert torch.isfinite(t.gini).all()  # layer 1 is not dead
    ref0 = ops.neuron_specialization(mass[:, 0].contiguous())
    ref1 = ops.neuron_specialization(mass[:2, 1].contiguous())
    torch.testing.assert_close(t.gini[0], ref0.gini)
    torch.testing.assert_close(t.gini[1], ref1.gini)
    assert torch.equal(t.top_category[1], ref1.top_category)  # indices into the full list
    # a top category of 2 at layer 0 stays 2 (full list), never remapped
    mass2 = mass.clone()
    mass2[2, 0] = 100.0
    t2 = neuron_table(mass2, usable=usable)
    assert (t2.top_category[0] == 2).all()
