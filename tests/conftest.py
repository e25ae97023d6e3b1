import os

# torch's OpenMP spin-waits cost ~8 ms per parallel region on virtual machines; must be set
# before torch loads (see docs/DESIGN-NOTES.md).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
import torch

import specext

CUDA = torch.cuda.is_available() and specext.build_info()["cuda"]

DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not CUDA, reason="no CUDA device")]),
]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def describe_mismatch(actual: torch.Tensor, expected: torch.Tensor, bad: torch.Tensor, what: str) -> str:
    """Where and how many elements differ, for failure messages."""
    idx = bad.nonzero()
    first = [tuple(i.tolist()) for i in idx[:5]]
    lines = [f"{what}: {int(bad.sum())} of {bad.numel()} elements differ; first at {first}"]
    for i in first:
        lines.append(f"  {i}: got {actual[i].item()!r}, expected {expected[i].item()!r}")
    return "\n".join(lines)


def assert_close(actual, expected, *, rtol, atol, what="tensor"):
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    nan_a, nan_e = actual.isnan(), expected.isnan()
    bad = (nan_a != nan_e) | (~nan_a & ~nan_e & ((actual - expected).abs() > atol + rtol * expected.abs()))
    assert not bad.any(), describe_mismatch(actual, expected, bad, what)


def assert_equal(actual, expected, what="tensor"):
    actual = actual.detach().cpu()
    expected = expected.detach().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    same = (actual == expected) | (actual.isnan() & expected.isnan()) if actual.is_floating_point() else actual == expected
    assert same.all(), describe_mismatch(actual.double(), expected.double(), ~same, what)
