"""Tests for specext.weights: streaming MLP down-projection reader over tiny safetensors checkpoints."""

import json
import logging
import weakref

import pytest
import torch
from safetensors.torch import save_file

import specext.weights as W
from specext.weights import DownProj, down_proj_shapes, find_down_proj_names, iter_down_proj

D_MODEL, D_FF, N_LAYERS = 7, 13, 3


def _rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _llama_like(prefix, down="mlp.down_proj", layers_key="layers"):
    """Tensors of a decoder with Linear down-projections stored (d_model, d_ff) plus distractors."""
    g = torch.Generator().manual_seed(0)
    t, down_names = {}, []
    t[f"{prefix}embed_tokens.weight"] = _rand(g, 11, D_MODEL)
    for i in range(N_LAYERS):
        p = f"{prefix}{layers_key}.{i}."
        t[p + "self_attn.o_proj.weight"] = _rand(g, D_MODEL, D_MODEL)
        t[p + "self_attn.q_proj.weight"] = _rand(g, D_MODEL, D_MODEL)
        t[p + "mlp.up_proj.weight"] = _rand(g, D_FF, D_MODEL)
        t[p + down + ".bias"] = _rand(g, D_MODEL)
        t[p + down + ".weight"] = _rand(g, D_MODEL, D_FF)
        down_names.append(p + down + ".weight")
    return t, down_names


def _families():
    """name -> (tensors, down_names_in_layer_order, stored_transposed, config)."""
    g = torch.Generator().manual_seed(1)
    out = {}

    t, names = _llama_like("model.")
    t["lm_head.weight"] = _rand(g, 11, D_MODEL)
    out["llama"] = (t, names, False, {"model_type": "llama", "intermediate_size": D_FF,
                                      "hidden_size": D_MODEL, "num_hidden_layers": N_LAYERS})

    # GPT-2 Conv1D: stored (in, out), so c_proj is (d_ff, d_model); attn.c_proj must not be picked.
    t, names = {}, []
    for i in range(N_LAYERS):
        p = f"transformer.h.{i}."
        t[p + "attn.c_attn.weight"] = _rand(g, D_MODEL, 3 * D_MODEL)
        t[p + "attn.c_proj.weight"] = _rand(g, D_MODEL, D_MODEL)
        t[p + "mlp.c_fc.weight"] = _rand(g, D_MODEL, D_FF)
        t[p + "mlp.c_proj.bias"] = _rand(g, D_MODEL)
        t[p + "mlp.c_proj.weight"] = _rand(g, D_FF, D_MODEL)
        names.append(p + "mlp.c_proj.weight")
    out["gpt2"] = (t, names, True, {"model_type": "gpt2", "n_inner": D_FF, "n_embd": D_MODEL,
                                    "n_layer": N_LAYERS})

    t, names = _llama_like("gpt_neox.", down="mlp.dense_4h_to_h")
    t["gpt_neox.layers.0.attention.dense.weight"] = _rand(g, D_MODEL, D_MODEL)
    out["neox"] = (t, names, False, {"model_type": "gpt_neox", "intermediate_size": D_FF,
                                     "num_hidden_layers": N_LAYERS})

    t, names = _llama_like("transformer.", down="mlp.dense_4h_to_h", layers_key="h")
    out["falcon"] = (t, names, False, {"model_type": "falcon", "ffn_hidden_size": D_FF,
                                       "num_hidden_layers": N_LAYERS})

    t, names = {}, []
    for i in range(N_LAYERS):
        p = f"bert.encoder.layer.{i}."
        t[p + "attention.output.dense.weight"] = _rand(g, D_MODEL, D_MODEL)
        t[p + "attention.output.dense.bias"] = _rand(g, D_MODEL)
        t[p + "intermediate.dense.weight"] = _rand(g, D_FF, D_MODEL)
        t[p + "output.dense.bias"] = _rand(g, D_MODEL)
        t[p + "output.LayerNorm.weight"] = _rand(g, D_MODEL)
        t[p + "output.dense.weight"] = _rand(g, D_MODEL, D_FF)
        names.append(p + "output.dense.weight")
    out["bert"] = (t, names, False, {"model_type": "bert", "intermediate_size": D_FF,
                                     "num_hidden_layers": N_LAYERS})

    t, names = _llama_like("model.language_model.")
    # The vision tower has its own layer stack and MLP; it must be ignored.
    t["model.vision_tower.vision_model.encoder.layers.0.mlp.fc2.weight"] = _rand(g, 5, 3)
    out["gemma3"] = (t, names, False, {
        "model_type": "gemma3",
        "text_config": {"intermediate_size": D_FF, "hidden_size": D_MODEL, "num_hidden_layers": N_LAYERS},
        "vision_config": {"intermediate_size": 3, "num_hidden_layers": 1},
    })
    return out


FAMILIES = _families()


def _write(d, tensors, config=None, fname="model.safetensors"):
    d.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(d / fname))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d


def _write_sharded(d, tensors, n_shards=2, index=True, config=None):
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    weight_map = {}
    for s in range(n_shards):
        fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::n_shards]}
        save_file(part, str(d / fname))
        weight_map.update({n: fname for n in part})
    if index:
        (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    if config is not None:
        (d / "config.json").write_text(json.dumps(config))
    return d, weight_map


def _expected(tensors, names, transposed):
    return [tensors[n].T if transposed else tensors[n] for n in names]


# ------------------------------------------------------------------------ families


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_yields_exact_layers(tmp_path, family):
    tensors, names, transposed, config = FAMILIES[family]
    d = _write(tmp_path / family, tensors, config)
    got = list(iter_down_proj(d))
    assert [g.layer for g in got] == list(range(N_LAYERS))
    assert [g.name for g in got] == names
    for g, want in zip(got, _expected(tensors, names, transposed)):
        assert isinstance(g, DownProj)
        assert g.transposed is transposed
        assert g.file == str(d / "model.safetensors")
        assert g.weight.shape == (D_MODEL, D_FF)
        assert torch.equal(g.weight, want)


def test_gpt2_weight_is_transposed_view_not_copy(tmp_path):
    tensors, names, _, config = FAMILIES["gpt2"]
    d = _write(tmp_path / "gpt2", tensors, config)
    for g in iter_down_proj(d):
        assert g.transposed
        # A view over the stored row-major (d_ff, d_model) data: column i is contiguous.
        assert g.weight._base is not None
        assert g.weight.stride() == (1, D_MODEL)
        assert g.weight.T.is_contiguous() and not g.weight.is_contiguous()
        assert torch.equal(g.weight, tensors[g.name].T)


def test_gpt2_n_inner_null_means_4x(tmp_path):
    g = torch.Generator().manual_seed(2)
    t = {f"h.{i}.mlp.c_proj.weight": _rand(g, 4 * D_MODEL, D_MODEL) for i in range(2)}
    d = _write(tmp_path / "m", t, {"model_type": "gpt2", "n_inner": None, "n_embd": D_MODEL, "n_layer": 2})
    assert down_proj_shapes(d) == [(0, (D_MODEL, 4 * D_MODEL)), (1, (D_MODEL, 4 * D_MODEL))]
    (d / "config.json").write_text(json.dumps({"n_inner": None, "n_embd": D_MODEL + 1}))
    with pytest.raises(ValueError, match="n_embd"):
        down_proj_shapes(d)


def test_works_without_config(tmp_path):
    tensors, names, _, _ = FAMILIES["llama"]
    d = _write(tmp_path / "m", tensors)
    assert [g.name for g in iter_down_proj(d)] == names


def test_single_file_path(tmp_path):
    tensors, names, _, config = FAMILIES["llama"]
    d = _write(tmp_path / "m", tensors, config)
    assert [g.name for g in iter_down_proj(d / "model.safetensors")] == names


# ------------------------------------------------------------------------ sharding


def test_sharded_with_index(tmp_path):
    tensors, names, _, config = FAMILIES["llama"]
    d, weight_map = _write_sharded(tmp_path / "m", tensors, 2, index=True, config=config)
    files = set()
    got = list(iter_down_proj(d))
    for g, want in zip(got, [tensors[n] for n in names]):
        assert g.file == str(d / weight_map[g.name])
        files.add(g.file)
        assert torch.equal(g.weight, want)
    assert [g.layer for g in got] == [0, 1, 2]
    assert len(files) == 2  # the down-projections really are spread over both shards


def test_index_and_a_stray_single_file_are_two_checkpoints(tmp_path):
    """transformers loads model.safetensors before any index: with both in one folder the
    norms (read through the index) would be another checkpoint's than the weights that ran."""
    from specext.kernels.weights import checkpoint_tensors

    tensors, names, _, config = FAMILIES["llama"]
    d, weight_map = _write_sharded(tmp_path / "m", tensors, 2, index=True, config=config)
    save_file({n: t * 2 for n, t in tensors.items()}, str(d / "model.safetensors"))
    for call in (lambda: list(iter_down_proj(d)), lambda: checkpoint_tensors(d)):
        with pytest.raises(ValueError, match=rf"{d} holds two checkpoints: model.safetensors and "
                                             r"model.safetensors.index.json, which names other files"):
            call()


def test_sharded_without_index(tmp_path):
    tensors, names, transposed, config = FAMILIES["gpt2"]
    d, weight_map = _write_sharded(tmp_path / "m", tensors, 2, index=False, config=config)
    got = list(iter_down_proj(d))
    assert [g.name for g in got] == names
    for g, want in zip(got, _expected(tensors, names, transposed)):
        assert g.file == str(d / weight_map[g.name])
        assert torch.equal(g.weight, want)


def test_index_ignores_unlisted_files(tmp_path):
    tensors, names, _, config = FAMILIES["llama"]
    d, _ = _write_sharded(tmp_path / "m", tensors, 2, index=True, config=config)
    # A stray file not in the index (e.g. a stale consolidated copy) would otherwise duplicate names.
    save_file({names[0]: torch.zeros(D_MODEL, D_FF)}, str(d / "stale.safetensors"))
    assert [g.name for g in iter_down_proj(d)] == names


def test_duplicate_tensor_across_files_without_index(tmp_path):
    tensors, names, _, _ = FAMILIES["llama"]
    d = _write(tmp_path / "m", tensors)
    save_file({names[1]: torch.zeros(D_MODEL, D_FF)}, str(d / "extra.safetensors"))
    with pytest.raises(ValueError, match="several files"):
        list(iter_down_proj(d))


# -------------------------------------------------------------------- dtype/shapes


def test_dtype_conversion(tmp_path):
    for family in ("llama", "gpt2"):
        tensors, names, transposed, config = FAMILIES[family]
        d = _write(tmp_path / family, tensors, config)
        for g, want in zip(iter_down_proj(d, dtype=torch.float16), _expected(tensors, names, transposed)):
            assert g.weight.dtype == torch.float16
            assert g.weight.shape == (D_MODEL, D_FF)
            assert torch.equal(g.weight, want.to(torch.float16))


def test_bf16_checkpoint_loaded_as_stored(tmp_path):
    tensors, names, _, config = FAMILIES["falcon"]
    d = _write(tmp_path / "m", {k: v.to(torch.bfloat16) for k, v in tensors.items()}, config)
    got = list(iter_down_proj(d, device="cpu"))
    assert all(g.weight.dtype == torch.bfloat16 for g in got)
    assert torch.equal(got[2].weight, tensors[names[2]].to(torch.bfloat16))


class _RecordingHandle:
    """Proxy over a safe_open handle that records which tensors were materialised."""

    def __init__(self, inner, log):
        self._inner, self._log = inner, log

    def __enter__(self):
        self._inner.__enter__()
        return self

    def __exit__(self, *exc):
        return self._inner.__exit__(*exc)

    def get_tensor(self, name):
        self._log.append(name)
        return self._inner.get_tensor(name)

    def __getattr__(self, item):
        return getattr(self._inner, item)


@pytest.fixture
def tensor_reads(monkeypatch):
    log = []
    real = W.safe_open
    monkeypatch.setattr(W, "safe_open", lambda *a, **k: _RecordingHandle(real(*a, **k), log))
    return log


def test_down_proj_shapes_reads_headers_only(tmp_path, tensor_reads):
    for family in ("gpt2", "bert"):
        tensors, _, _, config = FAMILIES[family]
        d, _ = _write_sharded(tmp_path / family, tensors, 2, index=True, config=config)
        assert down_proj_shapes(d) == [(i, (D_MODEL, D_FF)) for i in range(N_LAYERS)]
    assert tensor_reads == []


def test_iter_reads_only_down_proj_tensors(tmp_path, tensor_reads):
    tensors, names, _, config = FAMILIES["bert"]
    d = _write(tmp_path / "m", tensors, config)
    list(iter_down_proj(d))
    assert tensor_reads == names


def test_debug_logging(tmp_path, caplog):
    tensors, _, _, config = FAMILIES["neox"]
    d = _write(tmp_path / "m", tensors, config)
    with caplog.at_level(logging.DEBUG, logger="specext.kernels.weights"):
        list(iter_down_proj(d))
    assert sum("layer " in r.getMessage() for r in caplog.records) == N_LAYERS


# ---------------------------------------------------------------------- memory


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generator_holds_no_reference_to_yielded_layers(tmp_path, family):
    tensors, _, _, config = FAMILIES[family]
    d, _ = _write_sharded(tmp_path / family, tensors, 2, index=True, config=config)
    gen = iter_down_proj(d)
    for _ in range(N_LAYERS):
        dp = next(gen)
        refs = [weakref.ref(dp.weight)]
        if dp.weight._base is not None:
            refs.append(weakref.ref(dp.weight._base))
        del dp
        # Freed by refcounting alone, before the generator is resumed: the
        # suspended generator keeps nothing alive.
        assert all(r() is None for r in refs)
    with pytest.raises(StopIteration):
        next(gen)


def test_consumer_loop_keeps_at_most_one_layer(tmp_path):
    tensors, _, _, config = FAMILIES["gpt2"]
    d = _write(tmp_path / "m", tensors, config)
    refs = []
    for dp in iter_down_proj(d):
        assert sum(r() is not None for r in refs) == 0
        refs.append(weakref.ref(dp.weight))
    assert len(refs) == N_LAYERS


# ---------------------------------------------------------------------- errors


def test_missing_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        list(iter_down_proj(tmp_path / "does-not-exist"))


def test_empty_dir(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        down_proj_shapes(tmp_path / "empty")


def test_only_pickled_weights(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (d / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError) as ei:
        iter_down_proj(d)
    msg = str(ei.value)
    assert "safetensors" in msg and str(d) in msg and "pytorch_model.bin" in msg


def test_index_points_to_missing_file(tmp_path):
    tensors, names, _, config = FAMILIES["llama"]
    d, weight_map = _write_sharded(tmp_path / "m", tensors, 2, index=True, config=config)
    weight_map[names[2]] = "model-00003-of-00003.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(FileNotFoundError, match="model-00003-of-00003.safetensors"):
        iter_down_proj(d)


def test_index_points_outside_dir(tmp_path):
    tensors, names, _, _ = FAMILIES["llama"]
    d, weight_map = _write_sharded(tmp_path / "m", tensors, 2, index=True)
    weight_map[names[0]] = "../pytorch_model.bin"
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        down_proj_shapes(d)


def test_tensor_missing_from_indexed_file(tmp_path):
    tensors, names, _, config = FAMILIES["llama"]
    d, weight_map = _write_sharded(tmp_path / "m", tensors, 2, index=True, config=config)
    other = next(f for f in set(weight_map.values()) if f != weight_map[names[1]])
    weight_map[names[1]] = other
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ValueError, match=names[1].replace(".", "\\.")):
        iter_down_proj(d)


def test_config_intermediate_size_mismatch(tmp_path):
    tensors, names, _, config = FAMILIES["llama"]
    d = _write(tmp_path / "m", tensors, dict(config, intermediate_size=D_FF + 1))
    with pytest.raises(ValueError) as ei:
        iter_down_proj(d)
    msg = str(ei.value)
    assert names[0] in msg and "intermediate_size" in msg and str((D_MODEL, D_FF)) in msg


def test_config_mismatch_in_text_config(tmp_path):
    tensors, _, _, config = FAMILIES["gemma3"]
    bad = json.loads(json.dumps(config))
    bad["text_config"]["intermediate_size"] = 99
    d = _write(tmp_path / "m", tensors, bad)
    with pytest.raises(ValueError, match="text_config.intermediate_size"):
        down_proj_shapes(d)


def test_gpt2_stored_as_linear_is_caught_by_config(tmp_path):
    # A checkpoint whose c_proj is (d_model, d_ff) would be transposed the wrong way.
    g = torch.Generator().manual_seed(3)
    t = {f"h.{i}.mlp.c_proj.weight": _rand(g, D_MODEL, D_FF) for i in range(2)}
    d = _write(tmp_path / "m", t, {"n_inner": D_FF, "n_embd": D_MODEL, "n_layer": 2})
    with pytest.raises(ValueError, match="n_inner"):
        down_proj_shapes(d)


def test_layer_count_mismatch(tmp_path):
    tensors, _, _, config = FAMILIES["gpt2"]
    d = _write(tmp_path / "m", tensors, dict(config, n_layer=N_LAYERS + 1))
    with pytest.raises(ValueError, match="n_layer"):
        iter_down_proj(d)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    with pytest.raises(ValueError, match="num_hidden_layers"):
        find_down_proj_names(names, {"text_config": {"num_hidden_layers": 4}})


def test_missing_layer_in_middle(tmp_path):
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in (0, 2)]
    with pytest.raises(ValueError, match=r"layer\(s\) \[1\]"):
        find_down_proj_names(names)


def test_no_matching_names_lists_names_seen(tmp_path):
    g = torch.Generator().manual_seed(4)
    t = {"encoder.block.0.ffn.wo.weight": _rand(g, 3, 3), "shared.weight": _rand(g, 3, 3)}
    d = _write(tmp_path / "m", t)
    with pytest.raises(ValueError) as ei:
        iter_down_proj(d)
    assert "encoder.block.0.ffn.wo.weight" in str(ei.value) and "shared.weight" in str(ei.value)


def test_moe_names(tmp_path):
    g = torch.Generator().manual_seed(5)
    t = {}
    for i in range(2):
        t[f"model.layers.{i}.self_attn.o_proj.weight"] = _rand(g, 4, 4)
        for e in range(2):
            t[f"model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight"] = _rand(g, 4, 6)
    d = _write(tmp_path / "m", t)
    with pytest.raises(ValueError, match="mixture-of-experts"):
        iter_down_proj(d)


def test_moe_with_some_dense_layers():
    # DeepSeek-style: first layer dense, later layers MoE.
    names = ["model.layers.0.mlp.down_proj.weight",
             "model.layers.1.mlp.experts.0.down_proj.weight",
             "model.layers.1.mlp.shared_experts.down_proj.weight"]
    with pytest.raises(ValueError, match="mixture-of-experts"):
        find_down_proj_names(names)


# ------------------------------------------------------------ find_down_proj_names


def test_find_names_skips_attention_and_bias():
    names = ["transformer.h.1.attn.c_proj.weight", "transformer.h.1.mlp.c_proj.weight",
             "transformer.h.0.mlp.c_proj.bias", "transformer.h.0.mlp.c_proj.weight",
             "transformer.h.0.attn.c_proj.weight"]
    assert find_down_proj_names(iter(names)) == [
        (0, "transformer.h.0.mlp.c_proj.weight", True),
        (1, "transformer.h.1.mlp.c_proj.weight", True),
    ]
    bert = ["roberta.encoder.layer.0.attention.output.dense.weight",
            "roberta.encoder.layer.0.output.dense.weight"]
    assert find_down_proj_names(bert) == [(0, "roberta.encoder.layer.0.output.dense.weight", False)]


def test_find_names_prefixes():
    for prefix in ("", "model.", "language_model.model.", "model.language_model.", "transformer."):
        assert find_down_proj_names([f"{prefix}layers.0.mlp.down_proj.weight"]) == [
            (0, f"{prefix}layers.0.mlp.down_proj.weight", False)]
    # An unknown wrapper (e.g. a vision tower) is not taken for the language model.
    with pytest.raises(ValueError, match="no MLP down-projection"):
        find_down_proj_names(["vision_tower.layers.0.mlp.down_proj.weight"])


def test_find_names_duplicates_for_one_layer():
    names = ["model.layers.0.mlp.down_proj.weight", "layers.0.mlp.down_proj.weight"]
    with pytest.raises(ValueError) as ei:
        find_down_proj_names(names)
    assert all(n in str(ei.value) for n in names)


def test_find_names_quantised_rejected():
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.down_proj.weight_scale_inv"]
    with pytest.raises(ValueError, match="quantised"):
        find_down_proj_names(names)


def test_quantised_dtype_rejected(tmp_path):
    t = {f"model.layers.{i}.mlp.down_proj.weight": torch.zeros(D_MODEL, D_FF, dtype=torch.int8) for i in range(2)}
    d = _write(tmp_path / "m", t)
    with pytest.raises(ValueError, match="I8"):
        down_proj_shapes(d)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_iter_value_vector_norms_match_reference(tmp_path, family):
    from specext import reference

    tensors, names, transposed, config = _families()[family]
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    got = list(W.iter_value_vector_norms(tmp_path))
    assert [layer for layer, _ in got] == list(range(N_LAYERS))
    for (layer, norms), name in zip(got, names):
        stored = tensors[name].to(torch.bfloat16)
        w = stored.T if transposed else stored
        assert norms.dtype == torch.float32 and norms.shape == (D_FF,)
        torch.testing.assert_close(norms.double(), reference.value_vector_norms(w), rtol=1e-6, atol=0)


# ------------------------------------------------------- the naming table, exact names


def test_match_down_proj_relative_names():
    """Same layer's down-projection exactly when the names agree up to wrapper prefixes."""
    a = W.match_down_proj("model.layers.3.mlp.down_proj.weight")
    b = W.match_down_proj("model.language_model.layers.3.mlp.down_proj.weight")
    assert a == ("llama", 3, False, "layers.3.mlp.down_proj.weight") and a.relative == b.relative
    assert W.match_down_proj("bert.encoder.layer.1.output.dense.weight").relative == "encoder.layer.1.output.dense.weight"
    assert W.match_down_proj("model.layers.3.mlp.down_proj.bias") is None
    assert W.match_down_proj("model.layers.3.self_attn.o_proj.weight") is None
    # GPT-BigCode keeps GPT-2's names with an nn.Linear: the layout follows model_type.
    assert W.match_down_proj("transformer.h.0.mlp.c_proj.weight").transposed
    assert not W.match_down_proj("transformer.h.0.mlp.c_proj.weight", "gpt_bigcode").transposed


@pytest.mark.parametrize("name,family", [
    ("model.decoder.layers.{}.fc2.weight", "opt"),
    ("transformer.h.{}.mlp.fc_out.weight", "gptj"),
    ("model.layers.{}.mlp.fc2.weight", "phi"),
    ("transformer.blocks.{}.ffn.down_proj.weight", "mpt"),
    ("model.layers.{}.mlp.c_proj.weight", "starcoder2"),
    ("distilbert.transformer.layer.{}.ffn.lin2.weight", "distilbert"),
    ("transformer.h.{}.mlp.dense_4h_to_h.weight", "falcon"),
])
def test_more_families(name, family):
    names = [name.format(i) for i in range(2)] + ["model.vision_tower.encoder.layers.0.mlp.fc2.weight"]
    assert find_down_proj_names(names) == [(i, name.format(i), False) for i in range(2)]
    assert W.match_down_proj(names[0]).family == family


def test_encoder_decoder_refused():
    with pytest.raises(ValueError, match="encoder-decoder"):
        find_down_proj_names(["model.decoder.layers.0.fc2.weight"], {"is_encoder_decoder": True, "model_type": "bart"})


def test_down_proj_tensors_from_headers(tmp_path, tensor_reads):
    tensors, names, _, config = FAMILIES["gpt2"]
    d, weight_map = _write_sharded(tmp_path / "m", tensors, 2, index=True, config=config)
    got = W.down_proj_tensors(d)
    assert [(t.layer, t.name, t.file.name, t.family, t.transposed, t.shape) for t in got] == [
        (i, n, weight_map[n], "gpt2", True, (D_MODEL, D_FF)) for i, n in enumerate(names)]
    assert tensor_reads == []


def test_gpt_bigcode_layout_from_config(tmp_path):
    tensors, names, _, config = FAMILIES["gpt2"]
    linear = {k: (v.T.contiguous() if k in names else v) for k, v in tensors.items()}
    d = _write(tmp_path / "m", linear, {**config, "model_type": "gpt_bigcode"})
    got = list(iter_down_proj(d))
    assert all(not dp.transposed and dp.weight.is_contiguous() for dp in got)
    assert all(torch.equal(dp.weight, tensors[n].T) for dp, n in zip(got, names))


def test_names_read_exactly(tmp_path, tensor_reads):
    tensors, names, _, config = FAMILIES["llama"]
    d, weight_map = _write_sharded(tmp_path / "m", tensors, 2, index=True, config=config)
    assert [dp.name for dp in iter_down_proj(d, names=names)] == names
    assert tensor_reads == names


def test_names_that_are_not_the_checkpoints_are_refused(tmp_path, tensor_reads):
    tensors, names, _, config = FAMILIES["llama"]
    d, weight_map = _write_sharded(tmp_path / "m", tensors, 2, index=True, config=config)
    other = "model.layers.1.mlp.up_proj.weight"
    wrong = [names[0], other, names[2]]
    with pytest.raises(ValueError) as ei:
        iter_down_proj(d, names=wrong)
    msg = str(ei.value)
    assert f"{names[1]!r} in {d / weight_map[names[1]]}" in msg and f"{other!r} is in {d / weight_map[other]}" in msg
    with pytest.raises(ValueError, match="in no file"):
        iter_down_proj(d, names=[names[0], "model.layers.1.mlp.nope.weight", names[2]])
    with pytest.raises(ValueError, match=r"2 down-projection tensor names were asked for .* has 3"):
        W.iter_value_vector_norms(d, names=names[:2])
    assert tensor_reads == []


def test_one_handle_per_tensor_closed_before_the_layer_is_yielded(tmp_path, monkeypatch):
    """safetensors maps the file, and a tensor's pages stay resident while its handle is
    open: one handle per shard would keep every layer read from it in the process's RSS."""
    tensors, _, _, config = FAMILIES["llama"]
    d = _write(tmp_path / "m", tensors, config)
    open_now, opened = [0], [0]
    real = W.safe_open

    class Counting(_RecordingHandle):
        def __enter__(self):
            open_now[0] += 1
            opened[0] += 1
            return super().__enter__()

        def __exit__(self, *exc):
            open_now[0] -= 1
            return super().__exit__(*exc)

    monkeypatch.setattr(W, "safe_open", lambda *a, **k: Counting(real(*a, **k), []))
    gen = iter_down_proj(d)
    opened[0] = 0  # the plan's header reads
    for _ in gen:
        assert open_now[0] == 0
    assert opened[0] == N_LAYERS


def test_iter_value_vector_norms_dtype_and_names(tmp_path):
    from specext import reference

    tensors, names, _, config = FAMILIES["llama"]
    d = _write(tmp_path / "m", tensors, config)
    got = dict(W.iter_value_vector_norms(d, dtype=torch.bfloat16, names=names))
    for layer, name in enumerate(names):
        want = reference.value_vector_norms(tensors[name].to(torch.bfloat16))
        assert got[layer].dtype == torch.float32 and got[layer].device.type == "cpu"
        torch.testing.assert_close(got[layer].double(), want, rtol=1e-6, atol=0)


def test_norms_hold_one_layer_at_a_time(tmp_path, monkeypatch):
    """iter_value_vector_norms drops each layer before the next one is read."""
    tensors, _, _, config = FAMILIES["llama"]
    d = _write(tmp_path / "m", tensors, config)
    refs, alive_at_load = [], []
    real = W._load

    def load(*a, **k):
        alive_at_load.append(sum(r() is not None for r in refs))
        dp = real(*a, **k)
        refs.append(weakref.ref(dp.weight))
        return dp

    monkeypatch.setattr(W, "_load", load)
    assert [layer for layer, _ in W.iter_value_vector_norms(d)] == list(range(N_LAYERS))
    assert alive_at_load == [0] * N_LAYERS
