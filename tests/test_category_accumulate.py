"""category_accumulate against a float64 reference, on seeded inputs of odd shapes."""

import numpy as np
import pytest
import torch

import specext
from specext import ops, reference
from conftest import assert_close, assert_equal

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
STATS = list(ops.STATS)
SHAPES = [(1, 1), (3, 17), (423, 213), (97, 1031), (2, 4099)]


def make_inputs(T, N, C, dtype, device, seed=0, weighted=False, label_dtype=torch.int64):
    g = torch.Generator().manual_seed(seed)
    acts = (torch.randn(T, N, generator=g) * 3).to(dtype)
    labels = torch.randint(-1, C, (T,), generator=g).to(label_dtype)  # -1: skipped tokens
    weights = torch.rand(T, generator=g) * 2 if weighted else None
    to = lambda x: None if x is None else x.to(device)  # noqa: E731
    return to(acts), to(labels), to(weights)


def check_against_float64(acts, labels, C, weights, stat, sums, counts):
    """The kernel's error vs float64 must be at most twice that of torch's float32 index_add_
    (plus a floor of a few ulps of the largest sum)."""
    ref_s, ref_c = reference.category_accumulate(acts.cpu(), labels.cpu(), C, weights=None if weights is None else weights.cpu(),
                                                 stat=stat, dtype=torch.float64)
    ctl_s, _ = reference.category_accumulate(acts.cpu(), labels.cpu(), C, weights=None if weights is None else weights.cpu(),
                                             stat=stat, dtype=torch.float32)
    ctl_err = (ctl_s.double() - ref_s).abs().max().item() if ref_s.numel() else 0.0
    scale = ref_s.abs().max().item() if ref_s.numel() else 0.0
    atol = 2 * ctl_err + 4 * np.finfo(np.float32).eps * scale + 1e-30
    assert_close(sums, ref_s, rtol=0, atol=atol, what=f"sums (stat={stat}, control err {ctl_err:.3g})")
    assert_close(counts, ref_c, rtol=1e-6, atol=1e-6, what="counts")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stat", STATS)
def test_matches_float64_reference(device, shape, dtype, stat):
    T, N = shape
    C = 5
    acts, labels, _ = make_inputs(T, N, C, dtype, device, seed=T * 31 + N)
    sums, counts = ops.category_accumulate(acts, labels, C, stat=stat)
    assert sums.dtype == torch.float32 and sums.shape == (C, N) and sums.device == acts.device
    check_against_float64(acts, labels, C, None, stat, sums, counts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stat", STATS)
def test_weighted(device, dtype, stat):
    acts, labels, weights = make_inputs(311, 203, 7, dtype, device, seed=3, weighted=True)
    sums, counts = ops.category_accumulate(acts, labels, 7, weights=weights, stat=stat)
    check_against_float64(acts, labels, 7, weights, stat, sums, counts)


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
def test_label_dtypes_and_many_categories(device, label_dtype):
    acts, labels, _ = make_inputs(1000, 129, 1024, torch.bfloat16, device, seed=5, label_dtype=label_dtype)
    sums, counts = ops.category_accumulate(acts, labels, 1024)
    check_against_float64(acts, labels.long(), 1024, None, "abs", sums, counts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_chunked_equals_single_call(device, dtype):
    acts, labels, weights = make_inputs(517, 301, 6, dtype, device, seed=11, weighted=True)
    one_s, one_c = ops.category_accumulate(acts, labels, 6, weights=weights, stat="square")
    s = torch.zeros_like(one_s)
    c = torch.zeros_like(one_c)
    for lo, hi in [(0, 1), (1, 200), (200, 201), (201, 517)]:
        out = ops.category_accumulate(acts[lo:hi], labels[lo:hi], weights=weights[lo:hi], stat="square", sums=s, counts=c)
        assert out[0] is s and out[1] is c
    if device == "cpu":  # same summation order: bit for bit
        assert_equal(s, one_s, "chunked sums")
        assert_equal(c, one_c, "chunked counts")
    else:  # CUDA adds runs with atomics: order-dependent rounding
        assert_close(s, one_s, rtol=1e-5, atol=1e-5, what="chunked sums")
        assert_close(c, one_c, rtol=1e-6, atol=1e-6, what="chunked counts")


def test_accumulates_into_given_buffers(device):
    acts, labels, _ = make_inputs(50, 40, 3, torch.float32, device, seed=2)
    sums = torch.full((3, 40), 2.0, device=device)
    counts = torch.full((3,), 1.0, device=device)
    ops.category_accumulate(acts, labels, sums=sums, counts=counts)
    ref_s, ref_c = reference.category_accumulate(acts.cpu(), labels.cpu(), 3, dtype=torch.float64)
    assert_close(sums, ref_s + 2, rtol=1e-6, atol=1e-5, what="sums")
    assert_close(counts, ref_c + 1, rtol=0, atol=0, what="counts")


def test_simd_levels_agree_bit_for_bit():
    levels = specext.build_info()["simd_available"]
    start = specext.build_info()["simd"]
    acts, labels, weights = make_inputs(203, 1037, 9, torch.bfloat16, "cpu", seed=7, weighted=True)
    acts16 = acts.to(torch.float16)
    results = {}
    try:
        for lvl in levels:
            specext.set_simd_level(lvl)
            assert specext.build_info()["simd"] == lvl
            results[lvl] = [ops.category_accumulate(a, labels, 9, weights=w, stat=st)[0]
                            for a in (acts, acts16, acts.float()) for w in (None, weights) for st in STATS]
    finally:
        specext.set_simd_level(start)
    for lvl in levels[1:]:
        for i, (x, y) in enumerate(zip(results[levels[0]], results[lvl])):
            assert_equal(y, x, f"{lvl} vs {levels[0]} case {i}")


def test_special_values():
    check_special_values()


def check_special_values():
    """inf/nan propagate like the reference; relu maps NaN to 0 as documented."""
    acts = torch.tensor([[1.0, float("nan"), float("inf"), -2.0, 0.0, -0.0]] * 2)
    labels = torch.tensor([0, 1])
    for stat in STATS:
        s, _ = ops.category_accumulate(acts, labels, 2, stat=stat)
        r, _ = reference.category_accumulate(acts, labels, 2, stat=stat, dtype=torch.float64)
        assert_close(s, r, rtol=0, atol=0, what=f"stat={stat}")


def test_strided_rows(device):
    big = torch.randn(64, 300, device=device)
    acts = big[::2, 7:207]  # row stride 600, unit column stride
    labels = torch.arange(32, device=device) % 4
    s, c = ops.category_accumulate(acts, labels, 4)
    check_against_float64(acts, labels, 4, None, "abs", s, c)


def test_numpy_matches_torch():
    acts, labels, weights = make_inputs(123, 77, 4, torch.float32, "cpu", seed=9, weighted=True)
    ts, tc = ops.category_accumulate(acts, labels, 4, weights=weights, stat="relu")
    a = acts.numpy().copy()
    a.flags.writeable = False  # read-only inputs are fine
    ns, nc = ops.category_accumulate(a, labels.numpy().astype(np.int32), 4, weights=weights.numpy(), stat="relu")
    assert isinstance(ns, np.ndarray) and ns.dtype == np.float32
    np.testing.assert_array_equal(ns, ts.numpy())
    np.testing.assert_array_equal(nc, tc.numpy())
    ns16, _ = ops.category_accumulate(acts.numpy().astype(np.float16), labels.numpy(), 4)
    ts16, _ = ops.category_accumulate(acts.half(), labels, 4)
    np.testing.assert_array_equal(ns16, ts16.numpy())


def test_empty_inputs():
    s, c = ops.category_accumulate(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 3)
    assert s.shape == (3, 5) and not s.any() and not c.any()
    s, c = ops.category_accumulate(torch.zeros(4, 0), torch.zeros(4, dtype=torch.long), 3)
    assert s.shape == (3, 0) and c.tolist() == [4.0, 0.0, 0.0]


# ------------------------------------------------------------------ bad inputs


def _untouched_after(fn, sums, counts):
    s0, c0 = sums.clone(), counts.clone()
    fn()
    assert torch.equal(sums, s0) and torch.equal(counts, c0)


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
def test_label_out_of_range_raises_before_writing(device, label_dtype):
    acts = torch.randn(10, 8, device=device)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 3, 0, 1, 2], dtype=label_dtype, device=device)
    sums = torch.ones(3, 8, device=device)
    counts = torch.ones(3, device=device)
    s0, c0 = sums.clone(), counts.clone()
    with pytest.raises(ValueError, match=r"labels\[6\] = 3 is out of range for num_categories = 3"):
        ops.category_accumulate(acts, labels, sums=sums, counts=counts)
    assert torch.equal(sums, s0) and torch.equal(counts, c0)


@pytest.mark.parametrize(
    "mutate, exc, pattern",
    [
        (lambda a: a.update(acts=a["acts"].int()), TypeError, r"acts must be float32, float16 or bfloat16, got int32"),
        (lambda a: a.update(acts=a["acts"].double()), TypeError, r"acts must be .* got float64"),
        (lambda a: a.update(acts=a["acts"][0]), ValueError, r"acts must be 2-D \(tokens, neurons\), got 1-D"),
        (lambda a: a.update(labels=a["labels"].float()), TypeError, r"labels must be int32 or int64, got float32"),
        (lambda a: a.update(labels=a["labels"][:5]), ValueError, r"labels has 5 entries but acts has 6 rows"),
        (lambda a: a.update(labels=a["labels"][None]), ValueError, r"labels must be 1-D"),
        (lambda a: a.update(weights=torch.ones(5)), ValueError, r"weights has 5 entries but acts has 6 rows"),
        (lambda a: a.update(weights=torch.ones(6, dtype=torch.float64)), TypeError, r"weights must be float32"),
        (lambda a: a.update(acts=a["acts"].t().contiguous().t()), ValueError, r"acts must have unit stride along its last dimension"),
        (lambda a: a.update(sums=torch.zeros(3, 5)), ValueError, r"sums has 5 columns but acts has 4 neurons"),
        (lambda a: a.update(sums=torch.zeros(3, 4, dtype=torch.float64)), TypeError, r"sums must be float32"),
        (lambda a: a.update(counts=torch.zeros(2)), ValueError, r"counts has 2 entries but sums has 3 rows"),
        (lambda a: a.update(stat="mean"), ValueError, r"stat must be one of 'abs', 'square', 'relu', 'signed'"),
    ],
)
def test_bad_arguments(mutate, exc, pattern):
    args = dict(acts=torch.randn(6, 4), labels=torch.tensor([0, 1, 2, 0, 1, 2]), weights=None,
                sums=torch.ones(3, 4), counts=torch.ones(3), stat="abs")
    sums0, counts0 = args["sums"], args["counts"]
    mutate(args)
    s_before, c_before = args["sums"].clone(), args["counts"].clone()
    with pytest.raises(exc, match=pattern):
        ops.category_accumulate(args["acts"], args["labels"], weights=args["weights"], stat=args["stat"],
                                sums=args["sums"], counts=args["counts"])
    assert torch.equal(args["sums"], s_before) and torch.equal(args["counts"], c_before)
    assert torch.equal(sums0, torch.ones(3, 4)) and torch.equal(counts0, torch.ones(3))


def test_bad_python_arguments():
    acts, labels = torch.randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(ValueError, match="num_categories is required"):
        ops.category_accumulate(acts, labels)
    for bad in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_categories must be a positive int"):
            ops.category_accumulate(acts, labels, bad)
    with pytest.raises(ValueError, match="sums has 3 rows but num_categories is 4"):
        ops.category_accumulate(acts, labels, 4, sums=torch.zeros(3, 3))
    with pytest.raises(TypeError, match="do not mix torch tensors and numpy arrays"):
        ops.category_accumulate(acts, labels.numpy(), 2)
    with pytest.raises(TypeError, match="acts must be a torch.Tensor or numpy.ndarray, got list"):
        ops.category_accumulate([[1.0]], labels, 2)


def test_readonly_numpy_output_refused():
    sums = np.zeros((2, 3), np.float32)
    sums.flags.writeable = False
    with pytest.raises(ValueError, match="sums is read-only"):
        ops.category_accumulate(np.ones((2, 3), np.float32), np.array([0, 1]), sums=sums, counts=np.zeros(2, np.float32))


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("conftest").CUDA, reason="no CUDA device")
def test_cpu_cuda_mix_raises():
    acts = torch.randn(4, 3, device="cuda")
    sums = torch.zeros(2, 3)
    counts = torch.zeros(2)
    with pytest.raises(ValueError, match="acts and labels must be on the same device"):
        ops.category_accumulate(acts, torch.zeros(4, dtype=torch.long), sums=sums.cuda(), counts=counts.cuda())
    with pytest.raises(ValueError, match="acts and sums must be on the same device"):
        ops.category_accumulate(acts, torch.zeros(4, dtype=torch.long, device="cuda"), sums=sums, counts=counts)
    assert not sums.any() and not counts.any()


def test_opcheck(device):
    acts, labels, weights = make_inputs(37, 19, 4, torch.bfloat16, device, seed=1, weighted=True)
    sums = torch.zeros(4, 19, device=device)
    counts = torch.zeros(4, device=device)
    torch.library.opcheck(torch.ops.specext.category_accumulate_.default, (acts, labels, weights, sums, counts, "abs"))
    torch.library.opcheck(torch.ops.specext.category_accumulate_.default, (acts, labels, None, sums, counts, "square"))


# ------------------------------------------------------------------ unchecked mode (errors=)
# Labels >= C are skipped and recorded on the device instead of raising: [bad tokens,
# first bad label, its token index]. PromptStats uses it so a forward pass never syncs.


def _zeros_errors(device, rows=()):
    return torch.zeros((*rows, 3), dtype=torch.int64, device=device)


def _equal_or_close(actual, expected, device, what):
    if device == "cpu":  # same kernel, same summation order: bit for bit
        assert_equal(actual, expected, what)
    else:  # CUDA adds runs with atomics: order-dependent rounding
        assert_close(actual, expected, rtol=1e-5, atol=1e-5, what=what)


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stat", STATS)
def test_unchecked_equals_checked_on_valid_labels(device, stat, dtype, weighted, label_dtype):
    for T, N in [(423, 213), (2, 4099), (1, 1)]:
        acts, labels, weights = make_inputs(T, N, 7, dtype, device, seed=T + N, weighted=weighted,
                                            label_dtype=label_dtype)
        want_s, want_c = ops.category_accumulate(acts, labels, 7, weights=weights, stat=stat)
        errors = _zeros_errors(device)
        s, c = ops.category_accumulate(acts, labels, 7, weights=weights, stat=stat, errors=errors)
        _equal_or_close(s, want_s, device, f"sums {T}x{N}")
        _equal_or_close(c, want_c, device, f"counts {T}x{N}")
        assert errors.tolist() == [0, 0, 0]


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unchecked_skips_bad_labels_without_writing(device, dtype, label_dtype):
    T, N, C = 301, 67, 4
    acts, labels, weights = make_inputs(T, N, C, dtype, device, seed=13, weighted=True, label_dtype=label_dtype)
    bad_at = {5: 9, 17: C, 18: C, 200: 2**30}  # token -> label (first: labels[5] = 9)
    for t, lab in bad_at.items():
        labels[t] = lab
    clean = labels.clone()
    clean[list(bad_at)] = -1
    # sums/counts are views with guard rows above and below: an out-of-range write shows.
    big_s = torch.full((C + 2, N), 7.0, device=device)
    big_c = torch.full((C + 2,), 7.0, device=device)
    sums, counts = big_s[1:-1], big_c[1:-1]
    errors = _zeros_errors(device)
    ops.category_accumulate(acts, labels, weights=weights, stat="square", sums=sums, counts=counts, errors=errors)
    want_s, want_c = ops.category_accumulate(acts, clean, weights=weights, stat="square",
                                             sums=torch.full((C, N), 7.0, device=device),
                                             counts=torch.full((C,), 7.0, device=device))
    _equal_or_close(sums, want_s, device, "sums over the valid tokens")
    _equal_or_close(counts, want_c, device, "counts over the valid tokens")
    assert (big_s[0] == 7).all() and (big_s[-1] == 7).all() and big_c[0] == 7 and big_c[-1] == 7, "guard rows"
    assert errors.tolist() == [len(bad_at), 9, 5]


def test_unchecked_record_keeps_the_first_call(device):
    acts, labels, _ = make_inputs(90, 33, 3, torch.float32, device, seed=4)
    labels = labels.clone()
    labels[40], labels[52], labels[71] = 11, 3, 5  # chunk 2: [30, 60) -> local 10 and 22; chunk 3: local 11
    errors = _zeros_errors(device)
    s, c = torch.zeros(3, 33, device=device), torch.zeros(3, device=device)
    for lo, hi in [(0, 30), (30, 60), (60, 90)]:
        ops.category_accumulate(acts[lo:hi], labels[lo:hi], sums=s, counts=c, errors=errors)
    assert errors.tolist() == [3, 11, 10]  # count over all calls; label and local index of the first
    clean = labels.clone()
    clean[[40, 52, 71]] = -1
    want_s, want_c = ops.category_accumulate(acts, clean, 3)
    _equal_or_close(s, want_s, device, "sums")
    _equal_or_close(c, want_c, device, "counts")


def test_unchecked_numpy():
    acts, labels, weights = make_inputs(50, 21, 3, torch.float32, "cpu", seed=8, weighted=True)
    labels[7] = 3
    errors = np.zeros(3, np.int64)
    ns, nc = ops.category_accumulate(acts.numpy(), labels.numpy(), 3, weights=weights.numpy(), errors=errors)
    ts, tc = ops.category_accumulate(acts, torch.where(labels >= 3, -1, labels), 3, weights=weights)
    np.testing.assert_array_equal(ns, ts.numpy())
    np.testing.assert_array_equal(nc, tc.numpy())
    assert errors.tolist() == [1, 3, 7]
    with pytest.raises(ValueError, match=r"labels\[7\] = 3 is out of range for num_categories = 3"):
        ops.check_label_errors(errors, 3)


@pytest.mark.parametrize(
    "errors, exc, pattern",
    [
        (torch.zeros(3, dtype=torch.int32), TypeError, r"errors must be int64, got int32"),
        (torch.zeros(2, dtype=torch.int64), ValueError, r"errors must have 3 entries, got 2"),
        (torch.zeros(1, 3, dtype=torch.int64), ValueError, r"errors must be 1-D"),
        (np.zeros(3, np.int64), TypeError, r"do not mix torch tensors and numpy arrays"),
    ],
)
def test_unchecked_bad_errors_argument(errors, exc, pattern):
    sums, counts = torch.ones(3, 4), torch.ones(3)
    with pytest.raises(exc, match=pattern):
        ops.category_accumulate(torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 9]), sums=sums, counts=counts,
                                errors=errors)
    assert torch.equal(sums, torch.ones(3, 4)) and torch.equal(counts, torch.ones(3)) and not errors.any()


def test_unchecked_needs_a_category():
    with pytest.raises(ValueError, match="sums must have at least one category"):
        ops.category_accumulate(torch.randn(2, 4), torch.tensor([0, 1]), sums=torch.zeros(0, 4), counts=torch.zeros(0),
                                errors=torch.zeros(3, dtype=torch.int64))


def test_check_label_errors_messages():
    ops.check_label_errors(torch.zeros(3, dtype=torch.int64), 4)
    ops.check_label_errors(torch.zeros(5, 3, dtype=torch.int64), 4, row_name="layer")
    rec = torch.tensor([[0, 0, 0], [0, 0, 0], [2, 6, 31], [2, 6, 31]])
    with pytest.raises(ValueError, match=r"^layer 2: labels\[31\] = 6 is out of range for num_categories = 4 .*"
                                         r"4 such token\(s\) \(at layer\(s\) 2, 3\) were skipped"):
        ops.check_label_errors(rec, 4, row_name="layer")
    with pytest.raises(ValueError, match=r"errors must have shape \(3,\) or \(rows, 3\), got \(2,\)"):
        ops.check_label_errors(torch.zeros(2, dtype=torch.int64), 4)


def test_opcheck_unchecked(device):
    acts, labels, weights = make_inputs(37, 19, 4, torch.bfloat16, device, seed=1, weighted=True)
    sums = torch.zeros(4, 19, device=device)
    counts = torch.zeros(4, device=device)
    bad = labels.clone()
    bad[3] = 6
    op = torch.ops.specext.category_accumulate_unchecked_.default
    for lab, w, stat in [(labels, weights, "abs"), (labels, None, "square"), (bad, weights, "relu")]:
        torch.library.opcheck(op, (acts, lab, w, sums, counts, _zeros_errors(device), stat))


@pytest.mark.cuda
@pytest.mark.skipif(not __import__("conftest").CUDA, reason="no CUDA device")
def test_unchecked_cuda_does_not_synchronise():
    """No host sync (torch's sync debug mode raises on torch-side ones) and capturable in a
    CUDA graph (a cudaStreamSynchronize, cudaMemcpy or cudaMalloc of ours would break the
    capture); the replayed graph gives the eager result and records the error."""
    acts, labels, weights = make_inputs(1000, 515, 6, torch.bfloat16, "cuda", seed=21, weighted=True)
    labels[123] = 8
    sums, counts, errors = torch.zeros(6, 515, device="cuda"), torch.zeros(6, device="cuda"), _zeros_errors("cuda")
    ops.category_accumulate(acts, labels, weights=weights, sums=sums, counts=counts, errors=errors)  # warm-up (op load)
    torch.cuda.synchronize()
    want_s, want_c, want_e = sums.clone(), counts.clone(), errors.clone()
    for t in (sums, counts, errors):
        t.zero_()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.category_accumulate(acts, labels, weights=weights, sums=sums, counts=counts, errors=errors)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for t in (sums, counts, errors):
        t.zero_()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        ops.category_accumulate(acts, labels, weights=weights, sums=sums, counts=counts, errors=errors)
    for t in (sums, counts, errors):
        t.zero_()
    g.replay()
    torch.cuda.synchronize()
    assert_close(sums, want_s, rtol=1e-5, atol=1e-5, what="graph-replayed sums")
    assert_close(counts, want_c, rtol=1e-6, atol=1e-6, what="graph-replayed counts")
    assert errors.tolist() == want_e.tolist() == [1, 8, 123]


def test_eager_path_compile_and_fake_tensors():
    """Plain tensors go straight to the kernel; under torch.compile (fullgraph: a call
    outside the custom op would break the graph) and for FakeTensors the custom op and its
    fake are used. All three agree."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    acts, labels, weights = make_inputs(37, 19, 4, torch.float32, "cpu", seed=2, weighted=True)

    def f(a, lab, w):
        s, c, e = (torch.zeros(4, 19, device=a.device), torch.zeros(4, device=a.device),
                   torch.zeros(3, dtype=torch.int64, device=a.device))
        ops.category_accumulate(a, lab, weights=w, sums=s, counts=c, errors=e)
        s2, c2 = ops.category_accumulate(a, lab, 4, stat="square")
        return s, c, e, s2, c2

    eager = f(acts, labels, weights)
    via_op = (torch.zeros(4, 19), torch.zeros(4), torch.zeros(3, dtype=torch.int64))
    torch.ops.specext.category_accumulate_unchecked_(acts, labels, weights, *via_op, "abs")
    for x, y, what in zip(eager[:3], via_op, ("sums", "counts", "errors")):
        assert_equal(x, y, f"eager path vs custom op: {what}")
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(acts, labels, weights)
    for x, y, what in zip(compiled, eager, ("sums", "counts", "errors", "sums2", "counts2")):
        assert_equal(x, y, f"compiled vs eager: {what}")
    meta = [t.to("meta") for t in (acts, labels, weights)]
    s, c, e, s2, c2 = f(*meta)  # meta tensors: the op's fake, nothing read
    assert s.device.type == "meta" and s.shape == (4, 19) and c.shape == (4,)
    with FakeTensorMode() as mode:
        fa, fl, fw = (mode.from_tensor(t) for t in (acts, labels, weights))
        s, c, e, s2, c2 = f(fa, fl, fw)
        assert s.shape == (4, 19) and s2.shape == (4, 19) and c.shape == (4,) and e.shape == (3,)
