"""value_vector_norms against float64 torch on every float dtype and layout."""

import numpy as np
import pytest
import torch

import specext
from specext import ops, reference
from conftest import assert_close, assert_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def weight(R, K, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(R, K, generator=g) * 0.05).to(dtype).to(device)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (300, 1001), (64, 4099)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_matches_float64(device, dtype, shape):
    w = weight(*shape, dtype, seed=shape[0] + shape[1], device=device)
    got = ops.value_vector_norms(w)
    assert got.dtype == torch.float32 and got.shape == (shape[1],) and got.device == w.device
    assert_close(got, reference.value_vector_norms(w.cpu()), rtol=1e-6, atol=1e-12, what="norms")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(device, dtype):
    stored = weight(333, 77, dtype, seed=1, device=device)  # GPT-2 Conv1D stores (d_ff, d_model)
    for w in (stored.t(), stored[::2, ::3], stored[5:300].t()[:, ::2]):
        assert_close(ops.value_vector_norms(w), reference.value_vector_norms(w.cpu()), rtol=1e-6, atol=1e-12,
                     what=f"strides {w.stride()}")


def test_numpy_and_simd_levels():
    w = weight(129, 517, torch.float32, seed=3)
    start = specext.build_info()["simd"]
    outs = []
    try:
        for lvl in specext.build_info()["simd_available"]:
            specext.set_simd_level(lvl)
            outs.append(ops.value_vector_norms(w.bfloat16()))
    finally:
        specext.set_simd_level(start)
    for o in outs[1:]:
        assert_equal(o, outs[0], "norms across SIMD levels")
    np.testing.assert_array_equal(ops.value_vector_norms(w.numpy()), ops.value_vector_norms(w).numpy())
    np.testing.assert_array_equal(ops.value_vector_norms(w.numpy().T.copy().T), ops.value_vector_norms(w).numpy())


@pytest.mark.parametrize(
    "w, exc, pattern",
    [
        (torch.rand(5), ValueError, r"weight must be 2-D \(d_model, d_ff\), got 1-D"),
        (torch.ones(3, 4, dtype=torch.int32), TypeError, r"weight must be float32, float16, bfloat16 or float64, got int32"),
        (np.ones((3, 4), dtype=np.uint8), TypeError, r"weight must be float32, float16, bfloat16 or float64, got uint8"),
    ],
)
def test_bad_inputs(w, exc, pattern):
    with pytest.raises(exc, match=pattern):
        ops.value_vector_norms(w)


def test_opcheck(device):
    torch.library.opcheck(torch.ops.specext.value_vector_norms.default, (weight(9, 14, torch.bfloat16, device=device),))
