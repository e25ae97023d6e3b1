"""Kernel misuse that must fail loudly, and processes that must not hang (issue 13, items 4, 7)."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

import specext
from specext import ops
from test_category_accumulate import _equal_or_close

# ---------------------------------------------------------------------------- item 7: fork

CHILD_TIMEOUT_S = 60  # a hang fails the test instead of hanging CI


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((1031, 517)).astype(np.float32)  # enough for the norms kernel to use every thread
    labels = rng.integers(-1, 5, size=1031)
    return acts, labels


def _all_kernels(acts, labels):
    sums, counts = ops.category_accumulate(acts, labels, 5)
    stats = ops.neuron_specialization(sums)
    norms = ops.value_vector_norms(acts)
    t_sums, _ = ops.category_accumulate(torch.from_numpy(acts), torch.from_numpy(labels), 5)
    return sums, counts, stats.gini, norms, t_sums.numpy()


def _child(threads, calls, expected, queue):
    try:
        specext.set_num_threads(threads)
        acts, labels = _inputs()
        for _ in range(calls):
            got = _all_kernels(acts, labels)
            for g, e in zip(got, expected):
                np.testing.assert_array_equal(g, e)
        queue.put(("ok", specext.build_info()["threads"]))
    except BaseException as e:  # report, do not hang the parent on a dead queue
        queue.put(("error", repr(e)))


@pytest.mark.parametrize("threads", [1, 2, 4])
@pytest.mark.parametrize("method", ["fork", "forkserver", "spawn"])
def test_child_process_calls_kernels_repeatedly(method, threads):
    """Before the atfork handler a fork child hung on its second parallel call: the copied
    condition variable still counted the parent's waiting workers."""
    if method not in mp.get_all_start_methods():
        pytest.skip(f"{method} is not available on this platform")
    old = specext.build_info()["threads"]
    specext.set_num_threads(threads)
    try:
        acts, labels = _inputs()
        expected = _all_kernels(acts, labels)  # the parent's pool has started its workers
        ctx = mp.get_context(method)
        queue = ctx.Queue()
        procs = [ctx.Process(target=_child, args=(threads, 4, expected, queue)) for _ in range(2)]
        for p in procs:
            p.start()
        _all_kernels(acts, labels)  # the parent keeps working while its children run
        results = []
        for p in procs:
            p.join(CHILD_TIMEOUT_S)
        hung = [p.pid for p in procs if p.is_alive()]
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        assert not hung, f"{method} children {hung} hung calling the kernels with {threads} thread(s)"
        while not queue.empty():
            results.append(queue.get(timeout=5))
        assert results == [("ok", threads)] * 2, results
        assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    finally:
        specext.set_num_threads(old)


def test_grandchild_of_fork_after_kernel_calls():
    """A forked child that itself calls the kernels and forks again (nested data loaders)."""
    if "fork" not in mp.get_all_start_methods():
        pytest.skip("fork is not available on this platform")
    ctx = mp.get_context("fork")
    old = specext.build_info()["threads"]
    specext.set_num_threads(2)
    try:
        acts, labels = _inputs()
        expected = _all_kernels(acts, labels)
        queue = ctx.Queue()
        p = ctx.Process(target=_fork_again, args=(expected, queue))
        p.start()
        p.join(CHILD_TIMEOUT_S)
        if p.is_alive():
            p.kill()
            p.join()
            pytest.fail("forked child (or its own forked child) hung")
        assert queue.get(timeout=5) == ("ok", 2)
    finally:
        specext.set_num_threads(old)


def _fork_again(expected, queue):
    acts, labels = _inputs()
    _all_kernels(acts, labels)
    ctx = mp.get_context("fork")
    inner = ctx.Process(target=_child, args=(2, 3, expected, queue))
    inner.start()
    inner.join(CHILD_TIMEOUT_S // 2)
    if inner.is_alive():
        inner.kill()
        queue.put(("error", "grandchild hung"))


# ------------------------------------------------------- threads: a call uses what its work needs

GRAIN = 1 << 21  # csrc/accumulate_cpu.cpp accumulate_grain(): elements of work per thread (default)


@pytest.mark.parametrize("grains", [0.4, 2.3, 4.6])
def test_accumulate_is_bit_identical_on_every_thread_count(grains):
    """category_accumulate takes one thread per GRAIN elements of work, at most the pool's:
    a small call runs on the caller alone, a 2.3-grain one wakes one worker of a 3- or
    4-thread pool (the pool wakes only the workers a job can use), a 4.6-grain one all of
    them. Sums are bit-identical whatever the number, and repeated calls neither hang nor
    leave a worker behind for the next call."""
    n = 4099
    rng = np.random.default_rng(7)
    t = max(8, int(grains * GRAIN / n))
    acts = rng.standard_normal((t, n)).astype(np.float32)
    labels = rng.integers(-1, 6, size=t)
    old = specext.build_info()["threads"]
    try:
        specext.set_num_threads(1)
        ref_sums, ref_counts = ops.category_accumulate(acts, labels, 6)
        for threads in (2, 3, 4):
            specext.set_num_threads(threads)
            for _ in range(3):
                sums, counts = ops.category_accumulate(acts, labels, 6)
                np.testing.assert_array_equal(sums, ref_sums)
                np.testing.assert_array_equal(counts, ref_counts)
                # the other kernels use the whole pool in between: the workers left asleep
                # by a capped call must still answer them
                ops.value_vector_norms(acts[:64])
    finally:
        specext.set_num_threads(old)


# ---------------------------------------------------------------------------- item 4: aliasing

C, T, N = 5, 37, 23


def _acc_inputs(device, seed=1):
    g = torch.Generator().manual_seed(seed)
    acts = torch.randn(T, N, generator=g).to(device)
    labels = torch.randint(-1, C, (T,), generator=g).to(device)
    return acts, labels


def _same_sums(device, got, want, what):
    """Two calls' (sums, counts): bit for bit on the CPU (one summation order); on CUDA the
    blocks of different token chunks add into the same element with atomics in whatever
    order they finish, so two calls may differ in the last bits."""
    for g, w, name in zip(got, want, ("sums", "counts")):
        _equal_or_close(g, w, device, f"{what}: {name}")


def _to_numpy(*xs):
    return [None if x is None else x.cpu().numpy() for x in xs]


def test_output_with_stride_zero_is_refused(device):
    """expand() outputs used to sum every category into one shared row."""
    acts, labels = _acc_inputs(device)
    row = torch.zeros(1, N, device=device)
    with pytest.raises(ValueError, match=r"sums has stride 0 along dimension 0.*expand\(\)"):
        ops.category_accumulate(acts, labels, C, sums=row.expand(C, N))
    assert row.abs().sum().item() == 0  # nothing written
    one = torch.zeros(1, device=device)
    with pytest.raises(ValueError, match="counts has stride 0"):
        ops.category_accumulate(acts, labels, C, counts=one.expand(C))
    errors = torch.zeros(1, dtype=torch.int64, device=device).expand(3)
    with pytest.raises(ValueError, match="errors has stride 0"):
        ops.category_accumulate(acts, labels, C, errors=errors)


def test_output_with_stride_zero_is_refused_numpy():
    acts, labels = _to_numpy(*_acc_inputs("cpu"))
    buf = np.zeros((1, N), np.float32)
    sums = np.lib.stride_tricks.as_strided(buf, (C, N), (0, 4), writeable=True)
    with pytest.raises(ValueError, match="sums has stride 0"):
        ops.category_accumulate(acts, labels, C, sums=sums)
    assert not buf.any()


def test_output_with_overlapping_elements_is_refused(device):
    acts, labels = _acc_inputs(device)
    buf = torch.zeros(C + N, device=device)
    sums = torch.as_strided(buf, (C, N), (1, 1))  # row c starts one element after row c-1
    with pytest.raises(ValueError, match="sums has overlapping elements"):
        ops.category_accumulate(acts, labels, C, sums=sums)


def test_broadcast_inputs_are_accepted(device):
    """Inputs are only read: a stride-0 acts (every token the same row) is fine."""
    acts, labels = _acc_inputs(device)
    row = acts[:1].expand(T, N)
    sums, counts = ops.category_accumulate(row, labels, C)
    ref_s, ref_c = ops.category_accumulate(row.contiguous(), labels, C)
    _same_sums(device, (sums, counts), (ref_s, ref_c), "stride-0 acts vs contiguous")
    w = torch.ones(1, device=device).expand(T)
    sums_w, counts_w = ops.category_accumulate(acts, labels, C, weights=w)
    sums_1, counts_1 = ops.category_accumulate(acts, labels, C)
    _same_sums(device, (sums_w, counts_w), (sums_1, counts_1), "stride-0 unit weights vs none")


def _overlap_cases(device):
    """(name pattern, kwargs) pairs where an output shares memory with another argument."""
    acts, labels = _acc_inputs(device)
    cases = []
    big = torch.randn(T + C, N, device=device)
    cases.append(("sums and acts overlap", dict(acts=big[:T], labels=labels, sums=big[T - 1:T - 1 + C])))
    s = torch.zeros(C, N, device=device)
    cases.append(("sums and counts overlap", dict(acts=acts, labels=labels, sums=s, counts=s[:, 0])))
    w = torch.rand(T, device=device)
    cases.append(("counts and weights overlap", dict(acts=acts, labels=labels, weights=w, counts=w[:C])))
    lab = labels.clamp(min=0).to(torch.int64).clone()
    cases.append(("errors and labels overlap", dict(acts=acts, labels=lab, errors=lab[-3:])))
    # Interleaved rows share no element but their byte ranges overlap: refused (documented).
    inter = torch.zeros(2 * C, N, device=device)
    cases.append(("sums and acts overlap", dict(acts=inter[1::2], labels=labels[:C], sums=inter[0::2])))
    return cases


@pytest.mark.parametrize("case", range(5))
def test_output_overlapping_another_argument_is_refused(device, case):
    pattern, kw = _overlap_cases(device)[case]
    before = {k: v.clone() for k, v in kw.items()}
    with pytest.raises(ValueError, match=pattern + ".*written by this kernel"):
        ops.category_accumulate(kw.pop("acts"), kw.pop("labels"), C, **kw)
    for k, v in kw.items():
        assert torch.equal(v, before[k]), f"{k} was written before the error"


@pytest.mark.parametrize("case", range(5))
def test_output_overlapping_another_argument_is_refused_numpy(case):
    pattern, kw = _overlap_cases("cpu")[case]
    kw = {k: v.numpy() for k, v in kw.items()}  # views of the same memory stay views
    with pytest.raises(ValueError, match=pattern):
        ops.category_accumulate(kw.pop("acts"), kw.pop("labels"), C, **kw)


def test_disjoint_slices_of_one_buffer_are_accepted(device):
    acts, labels = _acc_inputs(device)
    buf = torch.zeros(T + C, N, device=device)
    buf[:T] = acts
    sums, counts = ops.category_accumulate(buf[:T], labels, C, sums=buf[T:])
    ref_s, ref_c = ops.category_accumulate(acts, labels, C)
    _same_sums(device, (sums, counts), (ref_s, ref_c), "slices of one buffer vs separate tensors")


def test_other_kernels_refuse_aliased_outputs(device):
    mass = torch.rand(C, N, device=device)
    outs = [torch.empty(N, device=device) for _ in range(6)]
    outs[3] = torch.empty(N, dtype=torch.int64, device=device)
    for i, bad in [(0, mass[0]), (2, outs[1])]:  # (stride 0 is refused there as "must be contiguous")
        o = list(outs)
        o[i] = bad
        with pytest.raises(ValueError, match="overlap in memory"):
            ops._native_neuron_specialization(mass, o)
    w = torch.rand(N, 7, device=device)
    with pytest.raises(ValueError, match="out and weight overlap"):
        ops._native_value_vector_norms(w, w[0])
    m = mass.cpu().numpy()
    with pytest.raises(ValueError, match="entropy and mass overlap"):
        ops._native_neuron_specialization(m, [m[0], np.empty(N, np.float32), np.empty(N, np.float32),
                                              np.empty(N, np.int64), np.empty(N, np.float32), np.empty(N, np.float32)])


@pytest.mark.parametrize("arg", ["sums", "counts"])  # errors is int64, which cannot require grad
def test_output_that_requires_grad_is_refused(device, arg):
    """A sums leaf with requires_grad used to be mutated in place."""
    acts, labels = _acc_inputs(device)
    shape, dtype = {"sums": ((C, N), torch.float32), "counts": ((C,), torch.float32)}[arg]
    leaf = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True)
    with pytest.raises(ValueError, match=f"{arg} is a leaf tensor that requires grad"):
        ops.category_accumulate(acts, labels, C, **{arg: leaf})
    assert leaf.detach().abs().sum().item() == 0
    non_leaf = torch.zeros(shape, dtype=dtype, device=device, requires_grad=True) * 1
    with pytest.raises(ValueError, match=f"{arg} is a tensor that requires grad"):
        ops.category_accumulate(acts, labels, C, **{arg: non_leaf})
    ops.category_accumulate(acts, labels, C, **{arg: leaf.detach()})  # the documented way out


def test_misaligned_data_is_refused_numpy():
    """A DLPack producer may hand over data that is not aligned to its elements (numpy does,
    for a view at a byte offset); on a GPU a misaligned load ends the whole CUDA context, so
    the binding refuses it on every device, naming the argument."""
    buf = np.zeros(4 * T * N + 1, np.uint8)
    acts = np.frombuffer(buf.data, dtype=np.float32, offset=1, count=T * N).reshape(T, N)
    assert not acts.flags.aligned
    labels = np.zeros(T, np.int64)
    with pytest.raises(ValueError, match=r"acts: data address is not aligned to its 4-byte elements"):
        ops.category_accumulate(acts, labels, C)
    np.testing.assert_array_equal(ops.category_accumulate(acts.copy(), labels, C)[1], [T] + [0] * (C - 1))


@pytest.mark.parametrize("dtype, name", [(torch.int16, "int16"), (torch.uint8, "uint8"), (torch.bool, "bool"),
                                         (torch.float32, "float32")])
def test_label_dtype_errors_say_what_is_expected(dtype, name):
    acts = torch.randn(T, N)
    with pytest.raises(TypeError, match=rf"^labels must be int32 or int64, got {name} "):
        ops.category_accumulate(acts, torch.zeros(T, dtype=dtype), C)


def test_impossible_num_categories_names_the_option():
    acts, labels = _acc_inputs("cpu")
    for a, lab in ((acts, labels), (acts.numpy(), labels.numpy())):
        with pytest.raises(ValueError, match=r"^num_categories = 1099511627776 with 23 neurons asks for a .* float32 "
                                             r"sums accumulator .*could not be allocated"):
            ops.category_accumulate(a, lab, 2**40)
