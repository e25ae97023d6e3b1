"""Kernel misuse that must fail loudly, and processes that must not hang (issue 13, items 4, 7)."""

import multiprocessing as mp

import numpy as np
import pytest
import torch

import specext
from specext import ops

# ---------------------------------------------------------------------------- item 7: fork

CHILD_TIMEOUT_S = 60  # a hang fails the test instead of hanging CI


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    acts = rng.standard_normal((1031, 517)).astype(np.float32)  # enough rows/columns to use every thread
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
