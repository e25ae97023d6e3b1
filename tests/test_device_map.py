"""One model over several devices (accelerate's device_map through transformers): a tiny
model forced by a small --max-memory budget onto the CPU and disk gives the in-memory
model's statistics, accuracy and PSS.

What is equal, and how: on the CPU every per-neuron table (neurons.safetensors), the
concept sums and counts (mass.safetensors), the accuracies, concepts.csv and the PSS rows
and curve are equal *bit for bit*: the prompt pass runs the same float32 kernels on the
same values (offloaded weights are the checkpoint's, streamed in for each forward), each
layer's statistics are folded in the same order whether the accumulators are one tensor or
one per layer. The option log-likelihoods of questions.jsonl (multi-token continuations,
scored on the prompt's key/value cache) may differ in the last float32 bits (seen: 1e-6 on
log-likelihoods of about -30, the last of the 6 decimals written): weights read back from
the offload folder are other buffers, and the CPU matrix kernels may round differently for
them; no prediction changes in this test. On GPUs, CUDA's ``index_add_`` is not ordered,
so the accumulators agree within float32 tolerance there (scripts/gpu_check.py).
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import test_analyze as TA
import tiny_models as T
from specext.analyze import main
from specext.metrics.specialization import ConceptMass
from specext.models.loading import load_model, parse_max_memory, value_norms
from specext.probes.scoring import EncodedBatch, PromptStats

pytest.importorskip("accelerate")

BUDGET = "cpu=150KB"  # the 4-layer tiny llama: embeddings and layers 0-1 on the CPU, layers 2-3 and the head on disk


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return T.save_tiny("llama", tmp_path_factory.mktemp("m") / "llama4", seed=1, layers=4)


@pytest.fixture(scope="module")
def probe_file(tmp_path_factory):
    return TA.make_probe(tmp_path_factory.mktemp("p") / "probe.jsonl")


def test_budget_puts_layers_on_cpu_and_disk(llama4, tmp_path):
    lm = load_model(llama4, device="cpu", device_map="auto", max_memory=BUDGET, offload_dir=tmp_path / "off")
    places = [p["placement"] for p in lm.layer_placement()]
    assert places == ["cpu", "cpu", "disk", "disk"]
    assert lm.device == torch.device("cpu") and lm.layer_devices == [torch.device("cpu")] * 4
    assert [s.module.weight.is_meta for s in lm.sites] == [False, False, True, True]
    mem = load_model(llama4, device="cpu")
    # The norms of offloaded layers come from the checkpoint, never from the meta weights.
    assert torch.equal(value_norms(lm), value_norms(mem))
    with pytest.raises(ValueError, match=r"layers \[2, 3\] are offloaded"):
        value_norms(lm, source="modules")


def _run(args):
    assert main(args) == 0


def test_offloaded_equals_in_memory(llama4, probe_file, tmp_path):
    common = [llama4, "--probe", probe_file, "--device", "cpu", "--no-report", "--batch-size", "4",
              "--ratios", "1,10", "--pss-concepts", "4", "--bootstrap", "20", "--max-new-tokens", "4",
              "--null-permutations", "2", "--pss-batch-rows", "16", "-q"]
    _run([*map(str, common), "--out", str(tmp_path / "mem")])
    _run([*map(str, common), "--out", str(tmp_path / "off"), "--device-map", "auto", "--max-memory", BUDGET,
          "--offload-dir", str(tmp_path / "offload")])
    mem, off = tmp_path / "mem", tmp_path / "off"
    for f in ("neurons.safetensors", "mass.safetensors"):
        a, b = load_file(str(mem / f)), load_file(str(off / f))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k].nan_to_num(-7.0), b[k].nan_to_num(-7.0)), f"{f}: {k}"
    for f in ("pss.csv", "pss_curve.csv", "concepts.csv"):
        assert (mem / f).read_text() == (off / f).read_text(), f
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (mem, off))
    sa.pop("seconds"), sb.pop("seconds")
    assert sa == sb  # accuracy, per-layer aggregates, PSS curves and intervals
    qa, qb = ([json.loads(x) for x in (d / "questions.jsonl").read_text().splitlines()] for d in (mem, off))
    for ra, rb in zip(qa, qb):
        assert {k: v for k, v in ra.items() if k != "logprobs"} == {k: v for k, v in rb.items() if k != "logprobs"}
        assert all(math.isclose(x, y, rel_tol=1e-6, abs_tol=2e-6) for x, y in zip(ra["logprobs"], rb["logprobs"]))
    model = json.loads((off / "config.json").read_text())["model"]
    assert [p["placement"] for p in model["layers_placement"]] == ["cpu", "cpu", "disk", "disk"]
    assert model["device_map"]["lm_head"] == "disk"
    assert json.loads((off / "config.json").read_text())["memory_plan"]["accumulate_device"] == "per-layer"
    assert json.loads((mem / "config.json").read_text())["model"]["device_map"] is None


def _stats(B, L, D, seed):
    g = torch.Generator().manual_seed(seed)
    st = torch.rand((B, L, D), generator=g)
    st[1, 2, 3] = float("nan")  # a non-finite prompt-layer
    return st


def test_per_layer_accumulators_equal_one_tensor():
    K, L, D, B = 5, 3, 17, 6
    one, per = ConceptMass(K, L, D), ConceptMass(K, L, D, device=["cpu"] * L)
    assert per.per_layer and not one.per_layer
    valid = torch.tensor([True, True, False, True, True, True])
    for step in range(4):
        idx = torch.tensor([0, 1, 1, 4, step, 2])
        st = _stats(B, L, D, step)
        ok = valid
        if step == 3:  # every prompt valid and finite (the CPU path's shortcut)
            st, ok = st.nan_to_num(0.5), torch.ones(B, dtype=torch.bool)
        one.add(idx, st, ok)
        per.add(idx, list(st.unbind(1)), ok)
    for k, v in one.state().items():
        assert torch.equal(v.nan_to_num(-1.0), per.state()[k].nan_to_num(-1.0)), k
    assert torch.equal(one.category_mass([0, 0, 1, 1, 1], 2), per.category_mass([0, 0, 1, 1, 1], 2))
    again = ConceptMass(K, L, D, device=["cpu"] * L)
    again.load_state(per.state())
    assert all(torch.equal(a, b) for a, b in zip(again.tensors(), per.tensors()))
    assert len(per.tensors()) == 3 * L + 1


@pytest.mark.parametrize("bad", [5, -1])
def test_concept_index_out_of_range_writes_nothing(bad):
    """The one-tensor CPU path sums through the kernel, which skips negative labels: an
    index outside [0, K) must still be an error that names it, with nothing written."""
    K, L, D = 5, 3, 17
    for mass in (ConceptMass(K, L, D), ConceptMass(K, L, D, device=["cpu"] * L)):
        with pytest.raises((ValueError, IndexError, RuntimeError), match=f"{bad}"):
            mass.add(torch.tensor([0, bad]), _stats(2, L, D, 0))
        assert all(not t.any() for t in mass.tensors())


def test_per_layer_prompt_stats_equal_one_tensor():
    B, S, L, D = 3, 5, 3, 11
    select = torch.rand((B, S), generator=torch.Generator().manual_seed(0)) > 0.4
    select[:, -1] = True
    att = torch.ones((B, S), dtype=torch.long)
    batch = EncodedBatch(torch.zeros((B, S), dtype=torch.long), att, att.cumsum(1) - 1, select, att.sum(1))
    acts = torch.randn((L, B, S, D), generator=torch.Generator().manual_seed(1))
    out = []
    for devices in (None, ["cpu"] * L):
        st = PromptStats(L, D, devices=devices)
        st.begin(batch)
        for l in range(L):
            st(l, acts[l])
        st.end()
        out.append((st.sums, st.counts, st.layer_sums))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert all(torch.equal(a, b) for a, b in zip(out[0][2], out[1][2]))


def test_max_memory_parsing():
    assert parse_max_memory("0=20GiB, cuda:1=20GiB,cpu=200MB") == {0: "20GiB", 1: "20GiB", "cpu": "200MB"}
    assert parse_max_memory("cpu=1000") == {"cpu": 1000}
    assert parse_max_memory(None) is None and parse_max_memory("") is None
    for bad, msg in (("cpu", "expected DEVICE=SIZE"), ("gpu0=1GB", "not a GPU index"), ("cpu=lots", "not a size"),
                     ("cpu=1GB,cpu=2GB", "given twice")):
        with pytest.raises(ValueError, match=msg):
            parse_max_memory(bad)


@pytest.mark.parametrize("argv, msg", [
    (["--max-memory", "cpu=1GB"], "need --device-map"),
    (["--offload-dir", "x"], "need --device-map"),
    (["--device-map", "auto", "--max-memory", "cpu=huge"], "not a size"),
])
def test_bad_device_map_options(llama4, probe_file, tmp_path, capsys, argv, msg):
    assert main([str(llama4), "--probe", str(probe_file), "--out", str(tmp_path / "o"), "-q", *argv]) == 2
    assert msg in capsys.readouterr().err


def test_device_map_needs_device_auto_or_cpu(llama4):
    with pytest.raises(ValueError, match="the map chooses the devices"):
        load_model(llama4, device="cuda:0", device_map="auto")
    with pytest.raises(ValueError, match="CPU \\(and disk\\) only"):
        load_model(llama4, device="cpu", device_map="auto", max_memory="0=1GB")
