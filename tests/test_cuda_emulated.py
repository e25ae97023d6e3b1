"""The CUDA kernels of csrc/*_cuda.cu, run on the CPU under the emulator of tests/cuda_emulator.py,
against the same float64 references as the CPU kernels.

Every kernel runs through the real binding's CUDA branch (capsules relabelled cuda:0), under
several thread schedules (a missing barrier shows as a schedule-dependent result), with
grids shrunk to exercise the grid-stride loops, and with the runtime's counters checked
where a path promises no allocation, copy or synchronisation. docs/testing.md says what this
proves and what only a GPU run can.
"""

import numpy as np
import pytest
import torch

from specext import ops, reference
from conftest import assert_close, assert_equal
import cuda_emulator
from test_category_accumulate import DTYPES, SHAPES, STATS, check_against_float64, check_special_values, make_inputs
from test_neuron_specialization import check as check_specialization, random_mass
from test_value_vector_norms import DTYPES as NORM_DTYPES, weight

ORDERS = [("forward", 1), ("reverse", 1), ("shuffle", 1), ("shuffle", 2)]


def under_every_schedule(emu, fn):
    """``[((order, seed), fn()), ...]`` for each of ORDERS, the first the plain forward one;
    the schedule is forward again afterwards."""
    out = []
    try:
        for order, seed in ORDERS:
            emu.schedule(order, seed)
            out.append(((order, seed), fn()))
    finally:
        emu.schedule("forward")
    return out


@pytest.fixture(scope="module")
def emu():
    missing = cuda_emulator.missing_tools()
    if missing:
        pytest.skip(f"the CUDA emulator needs {missing}: it compiles csrc/ with g++ and pybind11's headers "
                    "(both come with `bash scripts/setup.sh`)")
    e = cuda_emulator.load()
    with e.routing():
        yield e


def zeros_errors():
    return torch.zeros(3, dtype=torch.int64)


# ------------------------------------------------------------------ category_accumulate


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stat", STATS)
def test_accumulate_matches_float64(emu, shape, dtype, stat):
    T, N = shape
    acts, labels, _ = make_inputs(T, N, 5, dtype, "cpu", seed=T * 31 + N)
    sums, counts = ops.category_accumulate(acts, labels, 5, stat=stat)
    check_against_float64(acts, labels, 5, None, stat, sums, counts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("stat", STATS)
def test_accumulate_weighted(emu, dtype, stat):
    acts, labels, weights = make_inputs(611, 1100, 7, dtype, "cpu", seed=3, weighted=True)
    sums, counts = ops.category_accumulate(acts, labels, 7, weights=weights, stat=stat)
    check_against_float64(acts, labels, 7, weights, stat, sums, counts)


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
def test_accumulate_many_categories(emu, label_dtype):
    acts, labels, _ = make_inputs(1000, 129, 1024, torch.bfloat16, "cpu", seed=5, label_dtype=label_dtype)
    sums, counts = ops.category_accumulate(acts, labels, 1024)
    check_against_float64(acts, labels.long(), 1024, None, "abs", sums, counts)


def prompt_like(T, N, C, dtype, seed):
    """Tokens in runs of one category (a prompt's tokens share its category), runs crossing
    the kernel's 256-token chunks, with skipped tokens between some runs."""
    g = torch.Generator().manual_seed(seed)
    acts = (torch.randn(T, N, generator=g) * 2).to(dtype)
    labels = torch.empty(T, dtype=torch.int64)
    t = 0
    while t < T:
        n = int(torch.randint(1, 300, (1,), generator=g))
        labels[t:t + n] = int(torch.randint(-1, C, (1,), generator=g))
        t += n
    return acts, labels, torch.rand(T, generator=g)


def test_accumulate_label_runs(emu):
    acts, labels, weights = prompt_like(1500, 700, 6, torch.float16, seed=2)
    sums, counts = ops.category_accumulate(acts, labels, 6, weights=weights, stat="square")
    check_against_float64(acts, labels, 6, weights, "square", sums, counts)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_same_under_every_schedule(emu, dtype):
    """Each (category, column) is summed by one thread per block, blocks in a fixed order:
    the sums may not depend on the order of the threads (shared labels are read only after
    the barrier). Counts are summed by many threads with atomics: equal up to rounding."""
    acts, labels, weights = prompt_like(900, 613, 5, dtype, seed=4)
    (_, first), *rest = under_every_schedule(emu, lambda: ops.category_accumulate(acts, labels, 5, weights=weights,
                                                                                  stat="abs"))
    for (order, seed), (s, c) in rest:
        assert_equal(s, first[0], f"sums under schedule {order}/{seed}")
        assert_close(c, first[1], rtol=1e-6, atol=1e-6, what=f"counts under schedule {order}/{seed}")
    check_against_float64(acts, labels, 5, weights, "abs", *first)


def test_every_kernel_under_shuffled_blocks(emu):
    """A GPU promises no order of blocks: with blocks and threads shuffled, the sums agree up
    to the order of the atomics, the per-neuron outputs bit for bit (one writer per element),
    and unchecked mode records the same first bad token."""
    acts, labels, weights = prompt_like(1200, 1100, 5, torch.bfloat16, seed=8)
    labels[700], labels[300], labels[1100] = 8, 6, 9
    m = random_mass(97, 300, seed=5)
    w = weight(70, 200, torch.float16, seed=4)

    def run():
        errors = zeros_errors()
        s, c = ops.category_accumulate(acts, labels, 5, weights=weights, errors=errors)
        return s, c, errors, ops.neuron_specialization(m), ops.value_vector_norms(w)

    want = run()
    for seed in (1, 2, 3):
        emu.schedule("shuffle-blocks", seed)
        got = run()
        emu.schedule("forward")
        assert_close(got[0], want[0], rtol=1e-6, atol=1e-5, what=f"sums, block order {seed}")
        assert_close(got[1], want[1], rtol=1e-6, atol=1e-6, what=f"counts, block order {seed}")
        assert got[2].tolist() == want[2].tolist() == [3, 6, 300]
        for f in ops.NeuronStats._fields:
            assert_equal(getattr(got[3], f), getattr(want[3], f), f"{f}, block order {seed}")
        assert_equal(got[4], want[4], f"norms, block order {seed}")


@pytest.mark.parametrize("max_y", [1, 2, 3])
def test_accumulate_grid_stride_over_token_chunks(emu, max_y):
    """Past 65535 chunks (16.7M tokens) the kernel strides over chunks with a smaller grid;
    shrinking the grid here runs the same loop on a test-sized input."""
    acts, labels, weights = prompt_like(1300, 300, 4, torch.bfloat16, seed=6)
    want = ops.category_accumulate(acts, labels, 4, weights=weights)
    emu.max_grid_y(max_y)
    try:
        got = ops.category_accumulate(acts, labels, 4, weights=weights)
    finally:
        emu.max_grid_y(0)
    # Blocks now take chunks in another order, so the atomics add runs in another order.
    assert_close(got[0], want[0], rtol=1e-6, atol=1e-5, what=f"sums with grid.y = {max_y}")
    assert_close(got[1], want[1], rtol=1e-6, atol=1e-6, what="counts")
    check_against_float64(acts, labels, 4, weights, "abs", *got)


@pytest.mark.parametrize("chunk", [1, 7, 32, 100, 256])
def test_accumulate_every_chunk_length(emu, monkeypatch, chunk):
    """Tokens per block (SPECEXT_CUDA_CHUNK fixes what the launcher otherwise sizes to the
    GPU): the same sums, and the same first bad token in unchecked mode, for any length."""
    acts, labels, weights = prompt_like(700, 530, 5, torch.bfloat16, seed=chunk)
    labels[333], labels[650] = 9, 5  # bad: the first is token 333
    clean = labels.clone()
    clean[[333, 650]] = -1
    monkeypatch.setenv("SPECEXT_CUDA_CHUNK", str(chunk))
    errors = zeros_errors()
    s, c = ops.category_accumulate(acts, labels, 5, weights=weights, stat="relu", errors=errors)
    assert errors.tolist() == [2, 9, 333]
    assert emu.last_grid() == (2, -(-700 // chunk), 1)
    check_against_float64(acts, clean, 5, weights, "relu", s, c)


def test_accumulate_grid_fills_the_device(emu, monkeypatch):
    """Without SPECEXT_CUDA_CHUNK, short inputs get shorter chunks: about 8 blocks per SM
    (the emulated GPU has 4), in whole warps of tokens, at most 256."""
    monkeypatch.delenv("SPECEXT_CUDA_CHUNK", raising=False)
    # (tokens, columns) -> grid: 8 x 4 SMs / 2 column groups = 16 chunks of 128 tokens; with 8
    # column groups 4 chunks would do, but chunks stop at 256 tokens; 100 tokens: chunks of 32;
    # at most 32 tokens: one chunk; long inputs: 256-token chunks, as before.
    cases = {(2048, 1024): (2, 16), (2048, 4096): (8, 8), (100, 512): (1, 4), (20, 512): (1, 1),
             (40000, 2048): (4, 157)}
    for (T, N), grid in cases.items():
        acts, labels, _ = make_inputs(T, N, 3, torch.bfloat16, "cpu", seed=T + N)
        ops.category_accumulate(acts, labels, 3, errors=zeros_errors())
        assert emu.last_grid()[:2] == grid, (T, N, emu.last_grid())


def test_accumulate_chunked_equals_single_call(emu):
    acts, labels, weights = make_inputs(517, 301, 6, torch.bfloat16, "cpu", seed=11, weighted=True)
    one_s, one_c = ops.category_accumulate(acts, labels, 6, weights=weights, stat="square")
    s, c = torch.zeros_like(one_s), torch.zeros_like(one_c)
    for lo, hi in [(0, 1), (1, 200), (200, 201), (201, 517)]:
        ops.category_accumulate(acts[lo:hi], labels[lo:hi], weights=weights[lo:hi], stat="square", sums=s, counts=c)
    assert_close(s, one_s, rtol=1e-5, atol=1e-5, what="chunked sums")
    assert_close(c, one_c, rtol=1e-6, atol=1e-6, what="chunked counts")


def test_accumulate_strided_arguments(emu):
    g = torch.Generator().manual_seed(8)
    big = torch.randn(128, 900, generator=g)
    acts = big[::2, 7:707]  # row stride 1800
    labels = (torch.arange(128) % 5)[::2]  # stride 2
    weights = torch.rand(192, generator=g)[::3]  # stride 3
    big_s = torch.zeros(5, 800)
    sums = big_s[:, 50:750]  # row stride 800
    big_c = torch.zeros(10)
    counts = big_c[::2]
    ops.category_accumulate(acts, labels, weights=weights, sums=sums, counts=counts)
    check_against_float64(acts, labels, 5, weights, "abs", sums, counts)
    assert not big_s[:, :50].any() and not big_s[:, 750:].any() and not big_c[1::2].any(), "wrote outside the views"


def test_accumulate_special_values(emu):
    check_special_values()


def test_accumulate_empty(emu):
    emu.reset_counters()
    s, c = ops.category_accumulate(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), 3)
    assert not s.any() and not c.any() and emu.counters()["launches"] == 0
    s, c = ops.category_accumulate(torch.zeros(4, 0), torch.zeros(4, dtype=torch.long), 3)
    assert s.shape == (3, 0) and c.tolist() == [4.0, 0.0, 0.0]


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
def test_accumulate_checked_refuses_bad_label_before_writing(emu, label_dtype):
    acts = torch.randn(600, 8)
    labels = (torch.arange(600) % 3).to(label_dtype)
    labels[517], labels[590] = 3, 7  # the first, in the third 256-token chunk
    sums, counts = torch.ones(3, 8), torch.ones(3)
    emu.reset_counters()
    with pytest.raises(ValueError, match=r"labels\[517\] = 3 is out of range for num_categories = 3"):
        ops.category_accumulate(acts, labels, sums=sums, counts=counts)
    assert torch.equal(sums, torch.ones(3, 8)) and torch.equal(counts, torch.ones(3))
    n = emu.counters()
    assert n["launches"] == 2 and n["syncs"] == 1, n  # only the label check and the read of the bad label ran


def test_accumulate_checked_costs_one_sync(emu):
    acts, labels, _ = make_inputs(300, 40, 3, torch.float32, "cpu", seed=1)
    emu.reset_counters()
    ops.category_accumulate(acts, labels, 3)
    n = emu.counters()
    # the label check, the read of its label, counts, sums; one copy back of both words
    assert (n["launches"], n["syncs"], n["mallocs"], n["copies"]) == (4, 1, 1, 1), n


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_accumulate_unchecked_skips_bad_labels_without_sync(emu, dtype, label_dtype):
    T, N, C = 801, 530, 4
    acts, labels, weights = make_inputs(T, N, C, dtype, "cpu", seed=13, weighted=True, label_dtype=label_dtype)
    bad_at = {300: 9, 301: C, 517: C, 700: 2**30}  # token -> label; the first is labels[300] = 9
    for t, lab in bad_at.items():
        labels[t] = lab
    clean = labels.clone()
    clean[list(bad_at)] = -1
    big_s, big_c = torch.full((C + 2, N), 7.0), torch.full((C + 2,), 7.0)  # guard rows
    sums, counts = big_s[1:-1], big_c[1:-1]
    errors = zeros_errors()

    def one():
        errors.zero_()
        sums.fill_(7.0)
        counts.fill_(7.0)
        emu.reset_counters()
        ops.category_accumulate(acts, labels, weights=weights, stat="square", sums=sums, counts=counts, errors=errors)
        return emu.counters(), errors.tolist()

    for (order, seed), (n, record) in under_every_schedule(emu, one):  # the first bad token whatever the order
        assert (n["syncs"], n["mallocs"], n["copies"], n["memsets"]) == (0, 0, 0, 0), n
        assert record == [len(bad_at), 9, 300], (order, seed)
    want_s, want_c = ops.category_accumulate(acts, clean, weights=weights, stat="square",
                                             sums=torch.full((C, N), 7.0), counts=torch.full((C,), 7.0))
    assert_close(sums, want_s, rtol=1e-5, atol=1e-5, what="sums over the valid tokens")
    assert_close(counts, want_c, rtol=1e-6, atol=1e-6, what="counts over the valid tokens")
    assert (big_s[0] == 7).all() and (big_s[-1] == 7).all() and big_c[0] == 7 and big_c[-1] == 7, "guard rows"


def test_accumulate_unchecked_keeps_the_first_call(emu):
    acts, labels, _ = make_inputs(90, 33, 3, torch.float32, "cpu", seed=4)
    labels[40], labels[52], labels[71] = 11, 3, 5
    errors = zeros_errors()
    s, c = torch.zeros(3, 33), torch.zeros(3)
    for lo, hi in [(0, 30), (30, 60), (60, 90)]:
        ops.category_accumulate(acts[lo:hi], labels[lo:hi], sums=s, counts=c, errors=errors)
    assert errors.tolist() == [3, 11, 10]


def test_accumulate_unchecked_equals_checked(emu):
    for T, N in [(423, 213), (2, 4099), (1, 1)]:
        acts, labels, weights = make_inputs(T, N, 7, torch.bfloat16, "cpu", seed=T + N, weighted=True)
        want = ops.category_accumulate(acts, labels, 7, weights=weights, stat="relu")
        errors = zeros_errors()
        got = ops.category_accumulate(acts, labels, 7, weights=weights, stat="relu", errors=errors)
        assert_equal(got[0], want[0], f"sums {T}x{N}")
        assert_close(got[1], want[1], rtol=1e-6, atol=1e-6, what=f"counts {T}x{N}")
        assert errors.tolist() == [0, 0, 0]


def test_binding_cuda_branch_checks_devices(emu):
    """The binding's own CUDA-branch checks: a tensor labelled cuda:0 next to a CPU one."""
    acts, labels, counts = torch.randn(4, 3), torch.tensor([0, 1, 0, 1]), torch.zeros(2)
    relabelled = [ops._capsule(x) for x in (acts, labels, counts)]  # routing is on: cuda:0
    sums_cpu = torch.zeros(2, 3).__dlpack__()
    with pytest.raises(ValueError, match=r"acts and sums must be on the same device, got cuda:0 and cpu"):
        emu.native.category_accumulate(relabelled[0], relabelled[1], None, sums_cpu, relabelled[2], "abs")


def test_binding_cuda_error_becomes_python_error(emu):
    """A CUDA runtime error (here: a device that does not exist, cuda:1 on a one-device
    machine) reaches Python as a RuntimeError naming the call, not as a crash."""
    def cap(x):
        c = x.__dlpack__()
        cuda_emulator._relabel_cuda(c, device_id=1)
        return c

    w, out = torch.randn(5, 7), torch.zeros(7)
    with pytest.raises(RuntimeError, match=r"CUDA error in cudaSetDevice\(device\): invalid device ordinal"):
        emu.native.value_vector_norms(cap(w), cap(out))
    assert not out.any()


# ------------------------------------------------------------------ neuron_specialization


@pytest.mark.parametrize("C", [1, 2, 3, 7, 48, 49, 97, 130])
@pytest.mark.parametrize("N", [1, 17, 128, 129, 300])
def test_specialization_matches_float64(emu, C, N):
    m = random_mass(C, N, seed=C * 1000 + N)
    check_specialization(m, ops.neuron_specialization(m))


def test_specialization_invalid_columns(emu):
    m = random_mass(50, 260, seed=3)
    m[:, 0] = 0.0  # dead
    m[4, 1] = -1.0  # negative
    m[7, 2] = float("nan")
    m[9, 3] = float("inf")
    m[:, 4] = 0.0
    m[13, 4] = 2.5  # one-hot
    m[:, 5] = 1.0  # uniform
    got = ops.neuron_specialization(m)
    check_specialization(m, got)
    assert got.top_category[:4].tolist() == [-1, -1, -1, -1]
    assert got.gini[4].item() == pytest.approx(1 - 1 / 50, rel=1e-6) and got.gini[5].item() == 0.0


def test_specialization_same_under_every_schedule(emu):
    m = random_mass(130, 300, seed=9)
    (_, first), *rest = under_every_schedule(emu, lambda: ops.neuron_specialization(m))
    for (order, seed), r in rest:
        for f in ops.NeuronStats._fields:
            assert_equal(getattr(r, f), getattr(first, f), f"{f} under schedule {order}/{seed}")


def test_specialization_agrees_with_cpu_kernel(emu):
    m = random_mass(97, 257, seed=12)
    got = ops.neuron_specialization(m)
    from specext import _ext

    outs = [torch.empty(257), torch.empty(257), torch.empty(257), torch.empty(257, dtype=torch.int64),
            torch.empty(257), torch.empty(257)]
    _ext().neuron_specialization(m.__dlpack__(), *[o.__dlpack__() for o in outs], 0)  # the CPU kernel
    cpu = ops.NeuronStats(*outs)
    for f in ops.NeuronStats._fields:
        if f == "top_category":
            assert_equal(getattr(got, f), getattr(cpu, f), f)
        else:
            assert_close(getattr(got, f), getattr(cpu, f), rtol=1e-6, atol=1e-7, what=f)


# ------------------------------------------------------------------ value_vector_norms


@pytest.mark.parametrize("dtype", NORM_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (300, 101), (37, 1001)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_norms_match_float64(emu, dtype, shape):
    w = weight(*shape, dtype, seed=shape[0] + shape[1])
    got = ops.value_vector_norms(w)
    assert_close(got, reference.value_vector_norms(w), rtol=1e-6, atol=1e-12, what="norms")


@pytest.mark.parametrize("dtype", NORM_DTYPES, ids=str)
def test_norms_layouts(emu, dtype):
    stored = weight(133, 77, dtype, seed=1)  # GPT-2 Conv1D stores (d_ff, d_model)
    for w in (stored.t(), stored[::2, ::3], stored[5:100].t()[:, ::2]):
        assert_close(ops.value_vector_norms(w), reference.value_vector_norms(w), rtol=1e-6, atol=1e-12,
                     what=f"strides {w.stride()}")


def test_norms_same_under_every_schedule(emu):
    w = weight(75, 70, torch.bfloat16, seed=2)
    (_, first), *rest = under_every_schedule(emu, lambda: ops.value_vector_norms(w))
    for (order, seed), r in rest:
        assert_equal(r, first, f"norms under schedule {order}/{seed}")


# ------------------------------------------------------------------ the emulator itself


def test_emulator_exposes_a_missing_barrier(emu):
    """A kernel that reads a neighbour's shared-memory slot: with the barrier every schedule
    gives the right answer; without it some schedule gives a wrong one. So a kernel that
    passes under every schedule above does not depend on an unsynchronised read."""
    want = (np.arange(3 * 64) % 64 + 1) % 64
    out = np.zeros(3 * 64, np.int32)

    def with_and_without_barrier():
        assert emu.lib.specext_emu_selftest_exchange(out.ctypes.data, 3, 1)
        with_barrier = out.copy()
        assert emu.lib.specext_emu_selftest_exchange(out.ctypes.data, 3, 0)
        return with_barrier, out.copy()

    runs = under_every_schedule(emu, with_and_without_barrier)
    for (order, seed), (with_barrier, _) in runs:
        np.testing.assert_array_equal(with_barrier, want, err_msg=f"with the barrier, schedule {order}/{seed}")
    assert any(not np.array_equal(without, want) for _, (_, without) in runs), "no schedule exposed the missing barrier"


def test_emulator_refuses_what_a_gpu_refuses(emu):
    out = np.zeros(64, np.int32)
    assert emu.lib.specext_emu_selftest_bad_launch(out.ctypes.data) == 9  # cudaErrorInvalidConfiguration
    assert not out.any()


def test_translate_rewrites_every_launch():
    src = "k<<<g, 256, 0, st>>>(a, b);\nkern<D, Stat::Abs><<<grid, kThreads, 0, st>>>(a, i32);\nz<<<1, 1>>>();"
    out = cuda_emulator.translate(src, "x.cu")
    assert "<<<" not in out and out.count("::specext_emu::launch(") == 3
    assert "launch(::specext_emu::Config(1, 1), z)" in out
    with pytest.raises(RuntimeError, match=r"rewrote 0 of 1 kernel launches"):
        cuda_emulator.translate("(*fp)<<<1, 1>>>(x);", "y.cu")


# ------------------------------------------------------------------ memcheck (AddressSanitizer)


def _sanitizer_runtime(name: str) -> str:
    import shutil
    import subprocess

    cxx = shutil.which("g++")
    if not cxx:
        return ""
    path = subprocess.run([cxx, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
    return path if path.startswith("/") else ""


@pytest.mark.slow
def test_emulated_kernels_under_address_sanitizer():
    """The emulator's memcheck: every test above again, with the kernels, the binding and
    the emulator built with AddressSanitizer, so a read or write one element outside any
    tensor aborts with a report naming the kernel's source line."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    if cuda_emulator.missing_tools():
        pytest.skip(f"the CUDA emulator needs {cuda_emulator.missing_tools()}")
    asan, stdcxx = _sanitizer_runtime("libasan.so"), _sanitizer_runtime("libstdc++.so")
    if not asan or not stdcxx:
        pytest.skip("g++'s AddressSanitizer runtime (libasan) is not installed")
    env = dict(os.environ, SPECEXT_EMU_SANITIZE="address", ASAN_OPTIONS="detect_leaks=0",
               # libstdc++ preloaded too, or ASan cannot intercept the binding's C++ throws
               LD_PRELOAD=f"{asan} {stdcxx}")
    tests = Path(__file__)
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests),
                        "-k", "not address_sanitizer"], cwd=tests.parents[1], env=env, capture_output=True,
                       text=True, timeout=900)
    out = r.stdout + r.stderr
    assert r.returncode == 0 and "AddressSanitizer" not in out.replace(
        "WARNING: ASan doesn't fully support makecontext/swapcontext", ""), out[-6000:]
    assert " passed" in out and " skipped" not in out, out[-3000:]
