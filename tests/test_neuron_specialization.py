"""neuron_specialization against float64 torch, scipy, and hand-made distributions."""

import math

import numpy as np
import pytest
import torch

import specext
from specext import ops, reference
from conftest import assert_close, assert_equal

FIELDS = ops.NeuronStats._fields
# The kernels compute in float64 and round once to float32.
TOL = dict(rtol=1e-6, atol=1e-7)


def check(mass, stats):
    ref = reference.neuron_specialization(mass.cpu(), dtype=torch.float64)
    for f in FIELDS:
        got, exp = getattr(stats, f), getattr(ref, f)
        if f == "top_category":
            assert got.dtype == torch.int64
            assert_equal(got, exp, f)
        else:
            assert got.dtype == torch.float32
            assert_close(got, exp, what=f, **TOL)


def random_mass(C, N, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(C, N, generator=g) ** 3  # skewed, like activation masses
    m[:, torch.rand(N, generator=g) < 0.05] = 0.0  # dead neurons
    if C > 1:  # exact zeros inside live columns
        m[torch.rand(C, N, generator=g) < 0.1] = 0.0
    return m.to(device)


@pytest.mark.parametrize("C", [1, 2, 3, 7, 48, 49, 64, 525, 1030])
@pytest.mark.parametrize("N", [1, 15, 16, 17, 213])
def test_matches_float64_reference(device, C, N):
    m = random_mass(C, N, seed=C * 1000 + N, device=device)
    check(m, ops.neuron_specialization(m))


def test_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")  # the [test] extra; not needed to collect
    m = random_mass(37, 301, seed=4).numpy()
    st = ops.neuron_specialization(m)
    live = m.sum(0) > 0
    np.testing.assert_allclose(st.entropy[live], scipy_stats.entropy(m[:, live], axis=0), rtol=1e-6, atol=1e-7)
    # Gini as the mean absolute difference over all pairs / (2 * mean), a formula that needs no sort.
    x = m[:, live].astype(np.float64)
    mad = np.abs(x[:, None, :] - x[None, :, :]).sum((0, 1)) / x.shape[0] ** 2
    np.testing.assert_allclose(st.gini[live], mad / (2 * x.mean(0)), rtol=1e-6, atol=1e-7)


def test_hand_made_distributions():
    C = 6
    cols = {
        "uniform": [2.0] * C,
        "one_hot": [0, 0, 5.0, 0, 0, 0],
        "two_equal": [0, 3.0, 0, 0, 3.0, 0],
        "dead": [0.0] * C,
        "negative": [1.0, -1.0, 1, 1, 1, 1],
        "nan": [1.0, float("nan"), 1, 1, 1, 1],
        "inf": [1.0, float("inf"), 1, 1, 1, 1],
        "tie_top": [1.0, 4.0, 4.0, 0, 0, 0],
    }
    m = torch.tensor(list(cols.values()), dtype=torch.float32).t().contiguous()
    st = ops.neuron_specialization(m)
    k = {name: i for i, name in enumerate(cols)}
    u, o, t = k["uniform"], k["one_hot"], k["two_equal"]
    assert st.entropy[u].item() == pytest.approx(math.log(C), rel=1e-7)
    assert st.norm_entropy[u].item() == pytest.approx(1.0, rel=1e-7)
    assert st.gini[u].item() == pytest.approx(0.0, abs=1e-7)
    assert st.top_share[u].item() == pytest.approx(1 / C)
    assert st.top_category[u].item() == 0  # first of the tied maxima
    assert st.entropy[o].item() == 0.0 and st.norm_entropy[o].item() == 0.0
    assert st.gini[o].item() == pytest.approx(1 - 1 / C, rel=1e-7)
    assert st.top_category[o].item() == 2 and st.top_share[o].item() == 1.0
    assert st.entropy[t].item() == pytest.approx(math.log(2), rel=1e-7)
    assert st.gini[t].item() == pytest.approx((C - 2) / C, rel=1e-7)
    assert st.top_category[t].item() == 1 and st.top_share[t].item() == pytest.approx(0.5)
    assert st.top_category[k["tie_top"]].item() == 1
    for bad in ("dead", "negative", "nan", "inf"):
        i = k[bad]
        for f in ("entropy", "norm_entropy", "gini", "top_share"):
            assert math.isnan(getattr(st, f)[i].item()), (bad, f)
        assert st.top_category[i].item() == -1
    assert st.total[k["dead"]].item() == 0.0 and st.total[u].item() == 12.0
    assert st.total[k["negative"]].item() == 4.0


def test_single_category():
    st = ops.neuron_specialization(torch.tensor([[1.0, 0.0, 3.0]]))
    assert st.entropy.tolist()[0] == 0.0 and st.norm_entropy.tolist()[0] == 0.0 and st.gini.tolist()[0] == 0.0
    assert st.top_category.tolist() == [0, -1, 0]


def test_large_dynamic_range():
    m = torch.tensor([[1e30, 1e-30, 0.0], [1e30, 1.0, 1e-38], [3e38, 1.0, 1e-38]])
    check(m, ops.neuron_specialization(m))


def test_strided_rows_and_numpy():
    big = random_mass(9, 600, seed=8)
    m = big[:, 100:400]  # row stride 600
    st = ops.neuron_specialization(m)
    check(m, st)
    nst = ops.neuron_specialization(m.numpy())
    for f in FIELDS:
        np.testing.assert_array_equal(getattr(nst, f), getattr(st, f).numpy(), err_msg=f)


def test_simd_levels_agree_bit_for_bit():
    levels = specext.build_info()["simd_available"]
    start = specext.build_info()["simd"]
    m = random_mass(77, 1001, seed=3)
    out = {}
    try:
        for lvl in levels:
            specext.set_simd_level(lvl)
            out[lvl] = ops.neuron_specialization(m)
    finally:
        specext.set_simd_level(start)
    for lvl in levels[1:]:
        for f in FIELDS:
            assert_equal(getattr(out[lvl], f), getattr(out[levels[0]], f), f"{f} {lvl} vs {levels[0]}")


@pytest.mark.parametrize(
    "mass, exc, pattern",
    [
        (torch.rand(5), ValueError, r"mass must be 2-D \(categories, neurons\), got 1-D"),
        (torch.rand(3, 4, dtype=torch.float64), TypeError, r"mass must be float32, got float64"),
        (torch.rand(3, 4, dtype=torch.bfloat16), TypeError, r"mass must be float32, got bfloat16"),
        (torch.rand(0, 4), ValueError, r"mass must have at least one category"),
        (torch.rand(4, 3).t(), ValueError, r"mass must have unit stride along its last dimension"),
    ],
)
def test_bad_inputs(mass, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ops.neuron_specialization(mass)


def test_opcheck(device):
    # Live neurons only: opcheck compares outputs without equal_nan.
    m = (torch.rand(11, 40, generator=torch.Generator().manual_seed(2)) + 0.1).to(device)
    torch.library.opcheck(torch.ops.specext.neuron_specialization.default, (m,))
