"""Data parallel analysis under torchrun (two gloo ranks on the CPU): two ranks give the
single-process run directory, and a rank killed mid-run ends the run quickly with a clear
error, after which --resume completes it with the uninterrupted result."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny_models as T
from specext.pipelines.distributed import Dist
from test_analyze import make_probe, read_run
from specext.analyze import main

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")


def run_ranks(args, n=2, kill=None, timeout=300):
    """``torchrun --standalone --nproc_per_node n -m specext.analyze ARGS``; ``kill=(rank,
    stage, k)`` SIGKILLs that rank right after that checkpoint (tests/kill_at_checkpoint.py)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    target = ["-m", "specext.analyze"]
    if kill is not None:
        env["SPECEXT_KILL_RANK"] = str(kill[0])
        target = [str(ROOT / "tests" / "kill_at_checkpoint.py"), kill[1], str(kill[2]), "--"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n), *target,
           *map(str, args)]
    t0 = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    return r, time.monotonic() - t0


def run_one(args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("WORLD_SIZE", None)
    return subprocess.run([sys.executable, "-m", "specext.analyze", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=ROOT)


def test_shares_cover_everything_once():
    for n, chunk, world in [(720, 64, 2), (36, 5, 2), (36, 5, 3), (3, 5, 2), (100, 7, 8)]:
        ranges = [Dist(rank=r, world=world).chunk_range(n, chunk) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert all(lo % chunk == 0 for lo, _ in ranges)
        items = list(range(11))
        assert sorted(x for r in range(world) for x in Dist(rank=r, world=world).share(items)) == items
    assert Dist().chunk_range(36, 5) == (0, 36) and not Dist().active


def _close(a, b, atol):
    a, b = a.double(), b.double()
    return torch.equal(a.isnan(), b.isnan()) and torch.allclose(a.nan_to_num(0), b.nan_to_num(0), rtol=1e-5, atol=atol)


def _floats_close(x, y, path=""):
    if isinstance(x, dict):
        assert x.keys() == y.keys(), path
        for k in x:
            _floats_close(x[k], y[k], f"{path}.{k}")
    elif isinstance(x, list):
        assert len(x) == len(y), path
        for i, (a, b) in enumerate(zip(x, y)):
            _floats_close(a, b, f"{path}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        assert x == pytest.approx(y, rel=1e-5, abs=1e-6, nan_ok=True), path
    else:
        assert x == y, path


def test_two_ranks_equal_one_on_the_demo(tmp_path):
    args = ["--demo", "-q", "--no-report", "--pss-concepts", "4", "--bootstrap", "50", "--device", "cpu"]
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_one(args + ["--out", one])
    assert r.returncode == 0, r.stderr
    r, _ = run_ranks(args + ["--out", two])
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (two / ".state").exists()
    s1, n1, q1 = read_run(one)
    s2, n2, q2 = read_run(two)
    # Whole chunks per rank: every batch is the single-process batch, so per-question results,
    # accuracy and every PSS row are identical; the PSS baseline is the same on every rank.
    assert q1 == q2
    assert s1["accuracy"] == s2["accuracy"] and s1["accuracy_by_category"] == s2["accuracy_by_category"]
    for f in ("pss.csv", "pss_curve.csv", "pss_layers.json", "concepts.csv"):
        assert (one / f).read_text() == (two / f).read_text(), f
    assert s1["pss"] == s2["pss"]
    # Concept sums are partial sums per rank, then summed: equal up to float32 summation order.
    m1, m2 = load_file(str(one / "mass.safetensors")), load_file(str(two / "mass.safetensors"))
    assert torch.equal(m1["concept_counts"], m2["concept_counts"])
    assert _close(m1["concept_sums"], m2["concept_sums"], 1e-5) and _close(m1["category_mass"], m2["category_mass"], 1e-6)
    assert n1.keys() == n2.keys()
    for k in n1:
        if k in ("top_category", "above_null", "value_norms"):
            assert (n1[k] != n2[k]).float().mean() <= 1e-3, k
        else:
            assert _close(n1[k], n2[k], 1e-3 if k == "null_z" else 1e-5), k
    _floats_close(s1, s2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    return T.save_tiny("llama", d / "llama", seed=1), make_probe(d / "probe.jsonl")


def test_killed_rank_stops_the_run_and_resume_completes_it(tmp_path, tiny):
    model, probe = tiny
    args = [model, "--probe", probe, "--device", "cpu", "--batch-size", "3", "--chunk-size", "5", "-q", "--no-report",
            "--checkpoint-every", "0", "--no-open", "--ratios", "1,10", "--pss-concepts", "4", "--pss-control", "10",
            "--pss-batch-rows", "16", "--bootstrap", "50", "--dist-timeout", "30"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    r, _ = run_ranks(args + ["--out", full])
    assert r.returncode == 0, r.stdout + r.stderr

    # 36 questions in chunks of 5: rank 0 scores chunks 0-3, rank 1 chunks 4-7. Kill rank 1 after chunk 5.
    r, seconds = run_ranks(args + ["--out", killed], kill=(1, "scoring", 5))
    assert r.returncode != 0 and seconds < 60, (seconds, r.stderr[-3000:])
    err = r.stdout + r.stderr
    assert "rank: 1" in err and ("SIGKILL" in err or "Signal 9" in err), err[-3000:]
    prog = json.loads((killed / ".state" / "rank-1" / "progress.json").read_text())
    assert prog["next_question"] == 30 and prog["fingerprint"]["world_size"] == 2
    assert not (killed / "summary.json").exists()

    # One process cannot resume the ranks' checkpoint: refused naming the count, nothing touched
    # (it used to start over and delete it).
    before = sorted((p.relative_to(killed), p.stat().st_mtime_ns) for p in (killed / ".state").rglob("*"))
    assert main([str(a) for a in args] + ["--out", str(killed), "--resume"]) == 2
    assert sorted((p.relative_to(killed), p.stat().st_mtime_ns) for p in (killed / ".state").rglob("*")) == before

    # Resume; rank 1 is killed again after its first PSS concept, then a second resume finishes.
    r, seconds = run_ranks(args + ["--out", killed, "--resume"], kill=(1, "pss", 0))
    assert r.returncode != 0 and seconds < 60, (seconds, r.stderr[-3000:])
    assert len(json.loads((killed / ".state" / "rank-1" / "pss.json").read_text())) == 1
    r, _ = run_ranks(args + ["--out", killed, "--resume"])
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (killed / ".state").exists()
    s1, n1, q1 = read_run(full)
    s2, n2, q2 = read_run(killed)
    assert s1 == s2 and q1 == q2 and s1["pss"]["concepts"] == 4
    assert (full / "pss.csv").read_text() == (killed / "pss.csv").read_text()
    for k in n1:
        assert torch.equal(n1[k].nan_to_num(-7), n2[k].nan_to_num(-7)), k

