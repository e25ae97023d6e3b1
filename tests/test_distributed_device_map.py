"""A device map inside each torchrun rank (issue 10, items 1 + 2 combined): every rank maps
its own model over its own devices, within its own budget, offloading into its own folder.
On the CPU: two gloo ranks, each with a tiny --max-memory that sends half the layers to disk,
give the single-process in-memory run's results. The GPU slicing (a rank's share of the
node's cards, --max-memory keys relative to it) is tested on its arithmetic."""

import json

import pytest
import torch
from safetensors.torch import load_file

import tiny_models as T
from test_analyze import make_probe, read_run
from test_distributed import _close, _floats_close, run_one, run_ranks
from specext.pipelines import distributed as D

pytest.importorskip("accelerate")
pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is needed")

BUDGET = "cpu=150KB"  # the 4-layer tiny llama: layers 0-1 on the CPU, layers 2-3 and the head on disk


def test_two_ranks_each_with_a_device_map_equal_one_in_memory(tmp_path):
    model = T.save_tiny("llama", tmp_path / "llama4", seed=1, layers=4)
    probe = make_probe(tmp_path / "probe.jsonl")
    args = [model, "--probe", probe, "--device", "cpu", "--batch-size", "3", "--chunk-size", "6", "-q", "--no-report",
            "--no-open", "--ratios", "1,10", "--pss-concepts", "4", "--pss-control", "10", "--pss-batch-rows", "16",
            "--bootstrap", "20", "--null-permutations", "2", "--dist-timeout", "60"]
    one, two, off = tmp_path / "one", tmp_path / "two", tmp_path / "offload"
    r = run_one(args + ["--out", one])
    assert r.returncode == 0, r.stderr
    r, _ = run_ranks(args + ["--out", two, "--device-map", "auto", "--max-memory", BUDGET, "--offload-dir", off])
    assert r.returncode == 0, r.stdout + r.stderr
    # each rank got its own offload folder (transformers 5 streams disk-offloaded safetensors weights from the
    # checkpoint itself and writes there only what it must convert; ranks never share it)
    assert sorted(p.name for p in off.iterdir()) == ["rank-0", "rank-1"]
    cfg = json.loads((two / "config.json").read_text())
    assert [p["placement"] for p in cfg["model"]["layers_placement"]] == ["cpu", "cpu", "disk", "disk"]
    s1, n1, q1 = read_run(one)
    s2, n2, q2 = read_run(two)
    assert s1["accuracy"] == s2["accuracy"] and s1["accuracy_by_category"] == s2["accuracy_by_category"]
    assert s1["pss"] == s2["pss"]
    for f in ("pss.csv", "pss_curve.csv", "concepts.csv"):
        assert (one / f).read_text() == (two / f).read_text(), f
    # per question: the same predictions; log-likelihoods to the last float32 bits (offloaded weights)
    for a, b in zip(map(json.loads, q1.splitlines()), map(json.loads, q2.splitlines())):
        assert {k: v for k, v in a.items() if k != "logprobs"} == {k: v for k, v in b.items() if k != "logprobs"}
        assert a["logprobs"] == pytest.approx(b["logprobs"], rel=1e-6, abs=2e-6)
    m1, m2 = load_file(str(one / "mass.safetensors")), load_file(str(two / "mass.safetensors"))
    assert torch.equal(m1["concept_counts"], m2["concept_counts"])
    assert _close(m1["concept_sums"], m2["concept_sums"], 1e-5)
    assert n1.keys() == n2.keys()
    for k in n1:  # sums over questions: rank 0's plus rank 1's (docs/DESIGN-NOTES.md, "Data parallel")
        if k in ("top_category", "above_null", "value_norms"):
            assert (n1[k] != n2[k]).float().mean() <= 1e-3, k
        else:
            assert _close(n1[k], n2[k], 1e-3 if k == "null_z" else 1e-5), k
    _floats_close(s1, s2)


def _gpus(monkeypatch, n):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: n)


def test_rank_gpu_slices_and_relative_budgets(monkeypatch, tmp_path):
    _gpus(monkeypatch, 8)
    ranks = [D.Dist(rank=r, world=4, local_rank=r % 2, local_world=2) for r in range(4)]  # 2 nodes x 2 ranks
    assert [D.rank_gpus(d, "auto", "auto") for d in ranks] == [[0, 1, 2, 3], [4, 5, 6, 7]] * 2
    assert D.rank_device(ranks[1], "auto", "auto") == "cuda:4"
    assert D.rank_gpus(ranks[1], "cpu", "auto") is None and D.rank_device(ranks[1], "cpu", "auto") == "cpu"
    assert D.rank_gpus(ranks[1], "auto", None) is None and D.rank_device(ranks[1], "auto") == "cuda:1"
    o = D.load_options(ranks[1], "auto", "sequential", "0=20GiB,3=10GiB,cpu=100GiB", tmp_path / "off")
    assert o == {"device": "auto", "device_map": "sequential", "max_memory": {4: "20GiB", 7: "10GiB", "cpu": "100GiB"},
                 "offload_dir": tmp_path / "off" / "rank-1"}
    with pytest.raises(ValueError, match=r"relative to each rank's 4 card\(s\) \(0-3; rank 1 has cards \[4, 5, 6, 7\]\), got \[4\]"):
        D.load_options(ranks[1], "auto", "auto", "4=1GiB", None)
    # no --max-memory: the slice's free memory and a share of the host's
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {i: 1000 + i for i in range(8)} | {"cpu": 900})
    assert D.load_options(ranks[3], "auto", "auto", None, None)["max_memory"] == {4: 1004, 5: 1005, 6: 1006,
                                                                                   7: 1007, "cpu": 450}
    _gpus(monkeypatch, 1)
    with pytest.raises(ValueError, match=r"2 ranks on this node but 1 GPU\(s\)"):
        D.rank_gpus(ranks[0], "auto", "auto")
    # one process: unchanged
    assert D.load_options(D.Dist(), "auto", "auto", "cpu=1GB", "x") == {"device": "auto", "device_map": "auto",
                                                                        "max_memory": "cpu=1GB", "offload_dir": "x"}


def test_cpu_ranks_split_the_host_budget(monkeypatch):
    _gpus(monkeypatch, 0)
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "get_max_memory", lambda: {"cpu": 1001})
    d = D.Dist(rank=1, world=2, local_rank=1, local_world=2)
    o = D.load_options(d, "cpu", "auto", None, None)
    assert o["max_memory"] == {"cpu": 500} and o["offload_dir"] is None
    assert D.load_options(d, "cpu", "auto", "cpu=150KB", "/o")["max_memory"] == {"cpu": "150KB"}
