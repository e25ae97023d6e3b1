"""Issue 13: a checkpoint that is not the config's model, or is damaged, never runs (items 1
and 8); and clearer messages for a refused --resume, complex tensors and compare's inputs
(item 12). Each test reproduces the case: before the fix it ran silently or ended in a bare
traceback."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import tiny_models as T
from test_analyze import make_probe
from specext.analyze import main
from specext.kernels import weights as W
from specext.models.loading import ModelLoadError, load_model

KPROJ = "model.layers.1.self_attn.k_proj.weight"  # (16, 32) in the tiny Llama


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    return {"llama": T.save_tiny("llama", d / "llama4", seed=1, layers=4), "gpt2": T.save_tiny("gpt2", d / "gpt2"),
            "probe": make_probe(d / "probe.jsonl", n_cats=2, n_concepts=2, n_q=2)}


def variant(src: Path, dst: Path, layers=None, drop=(), edit=None) -> Path:
    shutil.copytree(src, dst)
    if layers is not None:
        c = json.loads((dst / "config.json").read_text())
        c["num_hidden_layers"] = layers
        (dst / "config.json").write_text(json.dumps(c))
    if drop or edit:
        t = load_file(str(dst / "model.safetensors"))
        for k in drop:
            del t[k]
        if edit:
            edit(t)
        save_file(t, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def rewrite_header(path: Path, fn) -> None:
    """Apply ``fn`` to the parsed header of a safetensors file, keeping its data bytes."""
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8 : 8 + n])
    fn(head)
    text = json.dumps(head).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])


# ---------------------------------------------------------------- item 1: config and weights disagree


@pytest.mark.parametrize("case, msg", [
    (dict(layers=6), r"18 tensor\(s\) the model needs are not in the checkpoint .*model\.layers\.\{4, 5\}\.mlp\.down_proj"),
    (dict(layers=2), r"18 checkpoint tensor\(s\) have no place in the model .*model\.layers\.\{2, 3\}\.mlp\.down_proj"),
    (dict(drop=["model.layers.1.mlp.down_proj.weight"]), r"not in the checkpoint .*: model\.layers\.1\.mlp\.down_proj\.weight"),
    (dict(drop=["model.layers.1.mlp.up_proj.weight"]), r"not in the checkpoint .*: model\.layers\.1\.mlp\.up_proj\.weight\. "
                                                       r"If these are heads .* --allow-missing"),
    (dict(edit=lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.weight", torch.zeros(31, 32))),
     r"'model\.layers\.1\.self_attn\.q_proj\.weight' in model\.safetensors has shape \(31, 32\), the model "
     r"\(config\.json\) needs \(32, 32\)"),
])
def test_config_and_weights_disagree(base, tmp_path, case, msg):
    d = variant(base["llama"], tmp_path / "m", **case)
    with pytest.raises(ModelLoadError, match=msg) as e:
        load_model(d, device="cpu")
    assert str(d) in str(e.value)


def test_allow_missing_warns_and_records(base, tmp_path):
    d = variant(base["llama"], tmp_path / "m", drop=["model.layers.1.mlp.up_proj.weight"])
    lm = load_model(d, device="cpu", allow_missing=True)
    assert len(lm.warnings) == 1 and "model.layers.1.mlp.up_proj.weight" in lm.warnings[0]
    out = tmp_path / "run"
    assert main([str(d), "--probe", str(base["probe"]), "--out", str(out), "--device", "cpu", "-q", "--no-pss",
                 "--no-report", "--no-open", "--null-permutations", "0", "--allow-missing"]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert any("--allow-missing" in w and "up_proj" in w for w in s["warnings"])
    assert json.loads((out / "config.json").read_text())["options"]["allow_missing"] is True
    # a missing down-projection (what is measured) and a wrong shape stay errors
    d2 = variant(base["llama"], tmp_path / "m2", drop=["model.layers.1.mlp.down_proj.weight"])
    with pytest.raises(ModelLoadError, match="never allowed to be missing"):
        load_model(d2, device="cpu", allow_missing=True)
    d3 = variant(base["llama"], tmp_path / "m3",
                 edit=lambda t: t.__setitem__("model.layers.1.self_attn.q_proj.weight", torch.zeros(31, 32)))
    with pytest.raises(ModelLoadError, match="has shape"):
        load_model(d3, device="cpu", allow_missing=True)


def test_tied_heads_and_buffers_are_not_missing(base, tmp_path):
    # GPT-2: lm_head tied to wte (not in the checkpoint); Llama: rotary inv_freq is a buffer
    for d in (base["gpt2"], base["llama"]):
        assert load_model(d, device="cpu").warnings == []
    import transformers as tf

    torch.manual_seed(0)
    cfg = T.config("llama")
    cfg.tie_word_embeddings = True
    m = tf.LlamaForCausalLM(cfg)
    cfg.architectures = ["LlamaForCausalLM"]
    d = tmp_path / "tied"
    m.save_pretrained(d)
    T.tokenizer().save_pretrained(d)
    assert "lm_head.weight" not in load_file(str(d / "model.safetensors"))
    lm = load_model(d, device="cpu")
    assert lm.warnings == [] and lm.model.lm_head.weight.data_ptr() == lm.model.model.embed_tokens.weight.data_ptr()



def test_buffers_saved_by_older_code_are_not_unexpected(base, tmp_path):
    """Old GPT-2 checkpoints carry attn.bias / attn.masked_bias (causal masks), old Llama ones
    rotary_emb.inv_freq: buffers computed from the config today, not another model."""
    def add(names, shape):
        return lambda t: t.update({n: torch.zeros(shape) for n in names})

    g = variant(base["gpt2"], tmp_path / "g", edit=add([f"transformer.h.{i}.attn.{b}" for i in range(2)
                                                           for b in ("bias", "masked_bias")], (1, 1, 4, 4)))
    l = variant(base["llama"], tmp_path / "l", edit=add([f"model.layers.{i}.self_attn.rotary_emb.inv_freq"
                                                         for i in range(4)], (4,)))
    assert load_model(g, device="cpu").warnings == [] and load_model(l, device="cpu").warnings == []
    # a real attention bias of a module that does not exist is still unexpected
    x = variant(base["gpt2"], tmp_path / "x", edit=add(["transformer.h.1.attn.c_extra.bias"], (4,)))
    with pytest.raises(ModelLoadError, match=r"transformer\.h\.1\.attn\.c_extra\.bias"):
        load_model(x, device="cpu")


def test_encoder_task_head_loaded_as_base_is_not_a_disagreement(tmp_path):
    """bert-base-uncased style: a BertForMaskedLM checkpoint (MLM head, no pooler) loads as
    BertModel for specialisation; the head's tensors and the pooler are expected, not refused."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = T.config("bert")
    cfg.architectures = ["BertForMaskedLM"]
    d = tmp_path / "bert-mlm"
    tf.BertForMaskedLM(cfg).save_pretrained(d)
    T.tokenizer().save_pretrained(d)
    lm = load_model(d, device="cpu")
    assert lm.warnings == [] and not lm.has_lm_head
    # but an unexpected tensor of the base model itself still is one
    t = load_file(str(d / "model.safetensors"))
    t["bert.encoder.layer.1.extra.weight"] = torch.zeros(2)
    save_file(t, str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"have no place .*: bert\.encoder\.layer\.1\.extra\.weight"):
        load_model(d, device="cpu")


# ---------------------------------------------------------------- item 8: corrupt or truncated checkpoints


def _truncate(p):
    p.write_bytes(p.read_bytes()[:-1000])


def _garbage(p):
    raw = bytearray(p.read_bytes())
    raw[8:40] = b"\xde\xad\xbe\xef" * 8
    p.write_bytes(bytes(raw))


def _huge_header(p):
    raw = bytearray(p.read_bytes())
    raw[:8] = struct.pack("<Q", 1 << 40)
    p.write_bytes(bytes(raw))


def _bad_shape(p):
    rewrite_header(p, lambda h: h[KPROJ].__setitem__("shape", [16, 31]))


def _swapped_shape(p):  # the same number of bytes, another shape
    rewrite_header(p, lambda h: h[KPROJ].__setitem__("shape", [32, 16]))


@pytest.mark.parametrize("damage, msg", [
    (_truncate, r"model\.safetensors is cut short: its tensors need \d+ bytes of data .*; 1000 missing\)"),
    (_garbage, r"model\.safetensors is not a valid safetensors file: its \d+-byte header is not JSON"),
    (_huge_header, r"model\.safetensors is not a valid safetensors file: its first 8 bytes give a header of "
                   r"1099511627776 bytes"),
    (_bad_shape, rf"model\.safetensors: tensor '{KPROJ}': shape \(16, 31\) of F32 needs 1984 bytes but its "
                 r"data_offsets .* hold 2048: the shape does not fit the offsets"),
    (_swapped_shape, rf"'{KPROJ}' in model\.safetensors has shape \(32, 16\), the model \(config\.json\) needs "
                     r"\(16, 32\)"),
])
def test_damaged_checkpoint_one_clear_error_and_no_run_directory(base, tmp_path, capsys, damage, msg):
    d = variant(base["llama"], tmp_path / "m")
    damage(d / "model.safetensors")
    with pytest.raises(ModelLoadError, match=msg):
        load_model(d, device="cpu")
    out = tmp_path / "runs" / "nested" / "out"
    assert main([str(d), "--probe", str(base["probe"]), "--out", str(out), "--device", "cpu", "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(d) in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # nothing this run created is left behind
    # an empty --out that existed before the run is kept (the damaged checkpoint is the error)
    (tmp_path / "mine").mkdir()
    assert main([str(d), "--probe", str(base["probe"]), "--out", str(tmp_path / "mine"), "--device", "cpu", "-q"]) == 2
    assert str(d) in capsys.readouterr().err
    assert (tmp_path / "mine").is_dir() and {p.name for p in (tmp_path / "mine").iterdir()} <= {".lock"}
    # one holding other files is refused before loading, and left exactly as it was
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    assert main([str(d), "--probe", str(base["probe"]), "--out", str(tmp_path / "theirs"), "--device", "cpu", "-q"]) == 2
    assert sorted(p.name for p in (tmp_path / "theirs").iterdir()) == ["notes.txt"]


def test_check_safetensors_overlap_gap_and_trailing_bytes(base, tmp_path):
    src = base["llama"] / "model.safetensors"
    p = tmp_path / "x.safetensors"
    assert set(W.check_safetensors(src)) == set(load_file(str(src)))
    shutil.copy(src, p)
    rewrite_header(p, lambda h: h[KPROJ].__setitem__("data_offsets", [h[KPROJ]["data_offsets"][0] + 4,
                                                                      h[KPROJ]["data_offsets"][1] + 4]))
    with pytest.raises(ValueError, match=rf"{p}: tensor .* starts at data byte"):
        W.check_safetensors(p)
    shutil.copy(src, p)
    p.write_bytes(p.read_bytes() + b"\0" * 16)
    with pytest.raises(ValueError, match="16 bytes follow the last tensor's data"):
        W.check_safetensors(p)
    p.write_bytes(b"\1\0")
    with pytest.raises(ValueError, match="it has 2 bytes, fewer than the 8"):
        W.check_safetensors(p)
    shutil.copy(src, p)
    rewrite_header(p, lambda h: h[KPROJ].__setitem__("dtype", "Q7"))
    with pytest.raises(ValueError, match=r"unknown dtype 'Q7'"):
        W.check_safetensors(p)


# ---------------------------------------------------------------- item 12: clearer messages


def test_refused_resume_names_changed_options(base, tmp_path):
    from specext.analyze import AnalyzeConfig
    from specext.metrics.pss import PSSConfig
    from specext.pipelines import rundir
    from specext.probes import load_probe

    probe = load_probe(str(base["probe"]))
    cfgs = [AnalyzeConfig(model_dir=str(base["llama"]), probe=str(base["probe"]), batch_size=b,
                          pss_config=PSSConfig(ratios=r)) for b, r in ((8, (1.0, 2.0)), (4, (1.0, 5.0)))]
    fps = [rundir.fingerprint(c, probe, base["llama"]) for c in cfgs]
    state = rundir.RunState(tmp_path)
    state.save(0, 4, fps[0], {"x": torch.zeros(2)}, [])
    with pytest.raises(ValueError, match=r"changed: --batch-size: 8 in the checkpoint, 4 now; "
                                         r"--ratios: \[1\.0, 2\.0\] in the checkpoint, \[1\.0, 5\.0\] now"):
        state.load(fps[1])
    state.load(fps[0])  # the same options resume


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_tensor_named_by_its_dtype(dtype):
    from specext import ops

    name = str(dtype).replace("torch.", "")
    x = torch.zeros((4, 3), dtype=dtype)
    for call, arg in ((lambda: ops.category_accumulate(x, torch.zeros(4, dtype=torch.long), num_categories=2), "acts"),
                      (lambda: ops.neuron_specialization(x), "mass"), (lambda: ops.value_vector_norms(x), "weight")):
        with pytest.raises(TypeError, match=rf"{arg}: dtype {name} is not supported") as e:
            call()
        assert "float64" not in str(e.value)
    with pytest.raises(TypeError, match=rf"mass: dtype {name} is not supported"):
        ops.neuron_specialization(x.numpy())


def _summary_dir(tmp_path, name, content):
    d = tmp_path / name
    d.mkdir()
    (d / "summary.json").write_text(content if isinstance(content, str) else json.dumps(content))
    return d


GOOD_SUMMARY = {"model": "m", "accuracy": {"mcq": 0.5}, "neurons": {"mean_gini": 0.2}, "probe": {"name": "world"}}


@pytest.mark.parametrize("content, msg", [
    ("[1, 2]", r"not a specext summary: the file holds a JSON list, not an object"),
    ("{\"accuracy\": ", r"not a specext summary: invalid JSON"),
    ({"model": "m"}, r"not a specext summary: no 'accuracy' or 'neurons' field"),
    (dict(GOOD_SUMMARY, accuracy="high"), r"malformed summary: 'accuracy' is \"high\" \(str\), expected an object"),
    (dict(GOOD_SUMMARY, neurons={"mean_gini": "0.2"}), r"'neurons\.mean_gini' is \"0\.2\" \(str\), expected"),
    (dict(GOOD_SUMMARY, pss={"score": "paper", "paper": {"peak": 0.1, "peak_ci": [0.1]}}),
     r"'pss\.paper\.peak_ci' is \[0\.1\], expected \[low, high\]"),
])
def test_compare_malformed_summary_names_file_and_problem(tmp_path, capsys, content, msg):
    from specext.compare import main as cmain

    d = _summary_dir(tmp_path, "bad", content)
    ok = _summary_dir(tmp_path, "ok", GOOD_SUMMARY)
    assert cmain([str(ok), str(d), "--out", str(tmp_path / "cmp"), "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{d / 'summary.json'}: " in err and "Traceback" not in err
    import re

    assert re.search(msg, err), err


def test_compare_out_is_a_file(tmp_path, capsys):
    from specext.compare import main as cmain

    ok = _summary_dir(tmp_path, "ok", GOOD_SUMMARY)
    f = tmp_path / "cmp.txt"
    f.write_text("mine")
    assert cmain([str(ok), "--out", str(f), "--bootstrap", "0"]) == 2
    assert f"--out {f} is an existing file, not a directory" in capsys.readouterr().err
    assert f.read_text() == "mine"
    assert cmain([str(ok), "--out", str(f / "sub"), "--bootstrap", "0"]) == 2
    assert "cannot create the output directory" in capsys.readouterr().err


def test_failure_after_a_checkpoint_keeps_the_new_run_directory(base, tmp_path):
    """Only a run that fails before its first checkpoint removes the directory it created."""
    from specext.analyze import AnalyzeConfig, run_analysis

    out = tmp_path / "new" / "run"

    def stop(stage, k):
        raise KeyboardInterrupt

    cfg = AnalyzeConfig(model_dir=str(base["llama"]), probe=str(base["probe"]), out=str(out), device="cpu",
                        pss=False, report=False, open_ended=False, null_permutations=0, checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt):
        run_analysis(cfg, progress=False, on_checkpoint=stop)
    assert (out / ".state" / "progress.json").is_file()


def test_sharded_checkpoint_validated_through_its_index(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = T.config("llama")
    cfg.architectures = ["LlamaForCausalLM"]
    d = tmp_path / "sharded"
    tf.LlamaForCausalLM(cfg).save_pretrained(d, max_shard_size="40KB")
    T.tokenizer().save_pretrained(d)
    shards = sorted(d.glob("model-*.safetensors"))
    assert len(shards) > 1 and (d / W.INDEX_NAME).is_file()
    names = W.checkpoint_tensors(d)
    assert {f for f, _, _ in names.values()} == set(shards)
    load_model(d, device="cpu")
    shards[-1].write_bytes(shards[-1].read_bytes()[:-8])
    with pytest.raises(ModelLoadError, match=rf"{shards[-1]} is cut short"):
        load_model(d, device="cpu")
    shards[-1].unlink()
    with pytest.raises(ModelLoadError, match=rf"maps tensors to {shards[-1].name}, which does not exist"):
        load_model(d, device="cpu")
