"""Model loading, down-projection discovery, capture and mask hooks on tiny random models."""

import pytest
import torch

import tiny_models as T
from specext.models import ModelLoadError, capture, find_mlp_sites, load_model, mask


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {a: T.save_tiny(a, root / a, seed=i) for i, a in enumerate(T.ARCHS)}


EXPECTED = {
    "llama": "model.layers.{}.mlp.down_proj",
    "qwen2": "model.layers.{}.mlp.down_proj",
    "qwen3": "model.layers.{}.mlp.down_proj",
    "gemma3": "model.layers.{}.mlp.down_proj",
    "mistral": "model.layers.{}.mlp.down_proj",
    "gemma2": "model.layers.{}.mlp.down_proj",
    "olmo2": "model.layers.{}.mlp.down_proj",
    "phi3": "model.layers.{}.mlp.down_proj",
    "gpt2": "transformer.h.{}.mlp.c_proj",
    "gpt_neox": "gpt_neox.layers.{}.mlp.dense_4h_to_h",
    "falcon": "transformer.h.{}.mlp.dense_4h_to_h",
    "bert": "encoder.layer.{}.output.dense",
}


@pytest.mark.parametrize("arch", T.ARCHS)
def test_finds_every_down_projection(saved, arch):
    lm = load_model(saved[arch], device="cpu")
    assert [s.name for s in lm.sites] == [EXPECTED[arch].format(i) for i in range(2)]
    assert lm.d_ff == 48 and all(s.d_model == 32 for s in lm.sites)
    assert lm.has_lm_head == (arch != "bert")
    for s in lm.sites:
        assert s.weight().shape == (32, 48)


def _manual_coefficients(arch, layer_module, x):
    """act(gate x) * up x, or act(fc x), recomputed from the block's own submodules."""
    if arch in ("llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "olmo2"):
        mlp = layer_module.mlp
        return mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    if arch == "phi3":
        mlp = layer_module.mlp
        gate, up = mlp.gate_up_proj(x).chunk(2, dim=-1)
        return up * mlp.activation_fn(gate)
    if arch == "gpt2":
        return layer_module.mlp.act(layer_module.mlp.c_fc(x))
    if arch in ("gpt_neox", "falcon"):
        return layer_module.mlp.act(layer_module.mlp.dense_h_to_4h(x))
    if arch == "bert":
        return layer_module.intermediate.intermediate_act_fn(layer_module.intermediate.dense(x))
    raise ValueError(arch)


def _blocks(lm):
    m = lm.model
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "encoder.layer"):
        obj = m
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return obj
        except AttributeError:
            continue
    raise AssertionError("no blocks")


@pytest.mark.parametrize("arch", T.ARCHS)
def test_captured_equals_manual_recomputation(saved, arch):
    lm = load_model(saved[arch], device="cpu")
    blocks = _blocks(lm)
    mlp_inputs = {}
    handles = []
    for i, b in enumerate(blocks):
        target = b.intermediate if arch == "bert" else b.mlp
        handles.append(target.register_forward_pre_hook(lambda mod, args, i=i: mlp_inputs.__setitem__(i, args[0].detach().clone())))
    got = {}
    ids = torch.tensor([[0, 5, 17, 42, 99, 7, 250], [0, 3, 3, 8, 100, 101, 2]])
    with capture(lm.sites, lambda l, m: got.__setitem__(l, m.detach().clone())):
        with torch.no_grad():
            lm.model(input_ids=ids)
    for h in handles:
        h.remove()
    assert sorted(got) == [0, 1]
    for i, b in enumerate(blocks):
        with torch.no_grad():
            want = _manual_coefficients(arch, b, mlp_inputs[i])
        assert got[i].shape == (2, 7, 48)
        torch.testing.assert_close(got[i], want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "bert"])
def test_hooks_leave_outputs_unchanged(saved, arch):
    lm = load_model(saved[arch], device="cpu")
    ids = torch.tensor([[0, 5, 17, 42, 99, 7]])
    with torch.no_grad():
        ref = lm.model(input_ids=ids)[0]
        with capture(lm.sites, lambda l, m: m.abs().sum()), mask(lm.sites, lambda l: None):
            out = lm.model(input_ids=ids)[0]
    assert torch.equal(ref, out)


def test_mask_per_row_zeroes_chosen_coefficients(saved):
    lm = load_model(saved["llama"], device="cpu")
    ids = torch.tensor([[0, 5, 17, 42], [0, 5, 17, 42]])
    m = torch.ones(2, 48)
    m[1, :10] = 0  # row 1 loses 10 coefficients in every layer, row 0 nothing
    seen = {}
    with torch.no_grad():
        ref = lm.model(input_ids=ids).logits
        with mask(lm.sites, lambda l: m), capture(lm.sites, lambda l, x: None):
            out = lm.model(input_ids=ids).logits
        # the capture hook registered after the mask sees the masked input
        with mask(lm.sites, lambda l: m), capture(lm.sites, lambda l, x: seen.__setitem__(l, x.clone())):
            lm.model(input_ids=ids)
    assert torch.equal(out[0], ref[0]) and not torch.allclose(out[1], ref[1])
    assert (seen[0][1, :, :10] == 0).all() and (seen[0][0, :, :10] != 0).any()


def test_errors(tmp_path, saved):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="is empty"):
        load_model(tmp_path / "empty")
    d = tmp_path / "noconfig"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="has no config.json"):
        load_model(d)
    d = tmp_path / "noweights"
    d.mkdir()
    (d / "config.json").write_text((saved["llama"] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match=r"has no weights \(no \*.safetensors file\)"):
        load_model(d)
    (d / "pytorch_model.bin").write_bytes(b"not a pickle")
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(d)
    d = tmp_path / "unsupported"
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "not_a_real_arch", "architectures": ["NopeForCausalLM"]}')
    (d / "model.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="unsupported or unreadable config"):
        load_model(d)
    with pytest.raises(ValueError, match="--dtype must be"):
        load_model(saved["llama"], dtype="int8")
    with pytest.raises(ValueError, match="--device must be"):
        load_model(saved["llama"], device="tpu")


def test_no_mlp_found_lists_modules():
    model = torch.nn.Sequential(torch.nn.ModuleList([torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)]))
    with pytest.raises(ModelLoadError, match=r"could not find one MLP down-projection per layer.*Linear modules seen"):
        find_mlp_sites(model, d_ff=16)


def test_dtype_option(saved):
    lm = load_model(saved["llama"], device="cpu", dtype="bfloat16")
    assert lm.dtype == torch.bfloat16


def _state(lm):
    return {k: v.detach().clone() for k, v in lm.model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_allow_pickle_permits_pickles_but_never_prefers_them(tmp_path):
    """allow_pickle=True loads safetensors whenever present (alone or next to a pickle) and
    a pickle only when it is the sole checkpoint; the default refuses a pickle-only dir."""
    import shutil

    safe_dir = T.save_tiny("llama", tmp_path / "safe", seed=11)
    safe = _state(load_model(safe_dir, device="cpu"))
    assert _same(_state(load_model(safe_dir, device="cpu", allow_pickle=True)), safe)

    # A dual-format dir whose pickle holds different weights: which file loaded is visible.
    dual_dir = tmp_path / "dual"
    shutil.copytree(safe_dir, dual_dir)
    shifted = {k: (v + 1.0 if v.is_floating_point() else v) for k, v in safe.items()}
    torch.save(shifted, dual_dir / "pytorch_model.bin")
    assert _same(_state(load_model(dual_dir, device="cpu", allow_pickle=True)), safe)
    assert _same(_state(load_model(dual_dir, device="cpu")), safe)

    pickle_dir = tmp_path / "pickle"
    shutil.copytree(dual_dir, pickle_dir)
    (pickle_dir / "model.safetensors").unlink()
    assert _same(_state(load_model(pickle_dir, device="cpu", allow_pickle=True)), shifted)
    with pytest.raises(ModelLoadError, match="--allow-pickle"):
        load_model(pickle_dir, device="cpu")


# ------------------------------------------- value-vector norms: checkpoint or modules


@pytest.fixture(scope="module")
def saved_bf16(tmp_path_factory):
    root = tmp_path_factory.mktemp("models_bf16")
    return {a: T.save_tiny(a, root / a, seed=20 + i, dtype=torch.bfloat16) for i, a in enumerate(T.ARCHS)}


def _streamed_calls(monkeypatch):
    """Count the checkpoint reads of value_norms (specext.kernels.weights.iter_value_vector_norms)."""
    from specext.kernels import weights

    calls = []
    real = weights.iter_value_vector_norms
    monkeypatch.setattr(weights, "iter_value_vector_norms", lambda *a, **k: calls.append(k) or real(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch", T.ARCHS)
def test_checkpoint_norms_equal_module_norms(saved, saved_bf16, arch, dtype, monkeypatch):
    """load_model binds every site to its checkpoint tensor; the norms streamed from the
    checkpoint equal the loaded modules' bit for bit (same values, same kernel), and the
    default source is the checkpoint."""
    from specext.models.loading import value_norms

    lm = load_model((saved if dtype == "float32" else saved_bf16)[arch], device="cpu")
    assert lm.dtype == getattr(torch, dtype)
    assert [s.tensor for s in lm.sites] == [EXPECTED[arch].format(i) + ".weight" for i in range(2)]
    assert all(s.file.endswith("model.safetensors") and s.from_checkpoint() for s in lm.sites)
    calls = _streamed_calls(monkeypatch)
    got = value_norms(lm)
    assert len(calls) == 1 and calls[0]["names"] == [s.tensor for s in lm.sites]
    from_modules = value_norms(lm, source="modules")
    assert got.shape == (2, 48) and got.dtype == torch.float32
    assert torch.equal(got, from_modules)
    assert torch.equal(got, value_norms(lm, source="checkpoint"))


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_checkpoint_norms_in_the_dtype_the_model_runs_in(saved, arch):
    """A float32 checkpoint loaded as bfloat16: the streamed layers are converted to the
    model's dtype, so the norms are the loaded weights' (not the float32 file's)."""
    from specext.models.loading import value_norms

    lm = load_model(saved[arch], device="cpu", dtype="bfloat16")
    got = value_norms(lm, source="checkpoint")
    assert torch.equal(got, value_norms(lm, source="modules"))
    full = value_norms(load_model(saved[arch], device="cpu"))
    assert not torch.equal(got, full)


def test_norms_from_modules_without_a_checkpoint(saved, monkeypatch):
    """The random twin (weights only in memory), a wrap_model model and weights changed after
    loading: value_norms reads the modules."""
    from specext.models.loading import value_norms, wrap_model
    from specext.models.twin import random_twin
    from specext.reference import value_vector_norms as ref

    lm = load_model(saved["llama"], device="cpu")
    calls = _streamed_calls(monkeypatch)
    twin = random_twin(lm, seed=3)
    assert all(s.tensor is None for s in twin.sites)
    want = torch.stack([ref(s.weight().detach()).float() for s in twin.sites])
    torch.testing.assert_close(value_norms(twin), want, rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="not bound to checkpoint tensors"):
        value_norms(twin, source="checkpoint")
    wrapped = wrap_model(lm.model, lm.tokenizer)
    assert torch.equal(value_norms(wrapped), value_norms(lm, source="modules"))
    assert calls == []

    before = value_norms(lm)
    with torch.no_grad():
        lm.sites[0].module.weight.mul_(2)
    assert not lm.sites[0].from_checkpoint() and lm.sites[1].from_checkpoint()
    after = value_norms(lm)
    assert calls == [calls[0]]  # only the first call streamed
    torch.testing.assert_close(after[0], 2 * before[0], rtol=1e-6, atol=0)
    assert torch.equal(after[1], before[1])


def test_demo_model_norms_unchanged():
    """What analyze writes as neurons.safetensors' value_norms: streamed from the shipped
    demo checkpoint, equal to the loaded modules' norms (the source before streaming)."""
    from specext.models.loading import value_norms
    from specext.probes.probeset import DATA_DIR

    lm = load_model(DATA_DIR / "demo_model", device="cpu")
    assert all(s.from_checkpoint() for s in lm.sites)
    assert torch.equal(value_norms(lm), value_norms(lm, source="modules"))


def test_checkpoint_names_that_do_not_match_the_modules(tmp_path):
    """A checkpoint whose down-projections are named for another architecture: transformers
    leaves the modules it cannot find randomly initialised; load_model refuses, naming the
    tensor and its file."""
    from safetensors.torch import load_file, save_file

    d = T.save_tiny("llama", tmp_path / "m", seed=5)
    f = d / "model.safetensors"
    t = load_file(str(f))
    t = {k.replace("mlp.down_proj", "mlp.dense_4h_to_h"): v for k, v in t.items()}
    save_file(t, str(f), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError) as ei:
        load_model(d, device="cpu")
    msg = str(ei.value)
    # transformers' loading info (issue 13 item 1): the modules' tensors missing, the checkpoint's unexpected
    assert "not in the checkpoint (transformers would initialise them at random): model.layers.{0, 1}.mlp.down_proj" \
        ".weight" in msg
    assert "have no place in the model config.json describes (they would be ignored): model.layers.{0, 1}.mlp." \
        f"dense_4h_to_h.weight (in {f})" in msg


def test_bound_names_are_reread_exactly(saved, tmp_path):
    """The checkpoint changed after loading (its tensors renamed): value_norms does not read
    other tensors than the ones bound at load time."""
    import shutil

    from safetensors.torch import load_file, save_file
    from specext.models.loading import value_norms

    d = tmp_path / "m"
    shutil.copytree(saved["llama"], d)
    lm = load_model(d, device="cpu")
    t = load_file(str(d / "model.safetensors"))
    save_file({k.replace("model.layers", "model.language_model.layers"): v for k, v in t.items()},
              str(d / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"'model.language_model.layers.0.mlp.down_proj.weight' in .*model.safetensors"):
        value_norms(lm)


# Architectures outside the test matrix that the naming table covers: module path of the
# down-projection of layer {}.
MORE = {
    "opt": "model.decoder.layers.{}.fc2",
    "gptj": "transformer.h.{}.mlp.fc_out",
    "codegen": "transformer.h.{}.mlp.fc_out",
    "phi": "model.layers.{}.mlp.fc2",
    "starcoder2": "model.layers.{}.mlp.c_proj",
    "gpt_bigcode": "transformer.h.{}.mlp.c_proj",
    "bloom": "transformer.h.{}.mlp.dense_4h_to_h",
    "mpt": "transformer.blocks.{}.ffn.down_proj",
    "persimmon": "model.layers.{}.mlp.dense_4h_to_h",
    "distilbert": "transformer.layer.{}.ffn.lin2",
}


def _more_config(arch):
    import transformers as tf

    H, I, L, V = 32, 48, 2, 320
    c = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    make = {
        "opt": lambda: tf.OPTConfig(hidden_size=H, ffn_dim=I, num_hidden_layers=L, num_attention_heads=4,
                                    max_position_embeddings=64, word_embed_proj_dim=H, **c),
        "gptj": lambda: tf.GPTJConfig(n_embd=H, n_inner=I, n_layer=L, n_head=4, n_positions=64, rotary_dim=4, **c),
        "codegen": lambda: tf.CodeGenConfig(n_embd=H, n_inner=I, n_layer=L, n_head=4, n_positions=64, rotary_dim=4,
                                            **c),
        "phi": lambda: tf.PhiConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=4, **c),
        "starcoder2": lambda: tf.Starcoder2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                                  num_attention_heads=4, num_key_value_heads=2, **c),
        "gpt_bigcode": lambda: tf.GPTBigCodeConfig(n_embd=H, n_inner=I, n_layer=L, n_head=4, n_positions=64, **c),
        "bloom": lambda: tf.BloomConfig(hidden_size=H, n_layer=L, n_head=4, **c),
        "mpt": lambda: tf.MptConfig(d_model=H, n_layers=L, n_heads=4, expansion_ratio=2, **c),
        "persimmon": lambda: tf.PersimmonConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L,
                                                num_attention_heads=4, **c),
        "distilbert": lambda: tf.DistilBertConfig(dim=H, hidden_dim=I, n_layers=L, n_heads=4, vocab_size=V,
                                                  pad_token_id=2),
    }
    return make[arch]()


@pytest.mark.parametrize("arch", sorted(MORE))
def test_more_architectures_by_the_same_table(tmp_path, arch):
    """Found by the naming table in the module tree and in the checkpoint alike (GPT-BigCode:
    GPT-2's names with an nn.Linear, told apart by model_type), norms equal both ways."""
    import transformers as tf

    from specext.models.loading import value_norms

    cfg = _more_config(arch)
    torch.manual_seed(0)
    model = tf.AutoModel.from_config(cfg) if arch == "distilbert" else tf.AutoModelForCausalLM.from_config(cfg)
    cfg.architectures = [type(model).__name__]
    model.save_pretrained(tmp_path, safe_serialization=True)
    T.tokenizer().save_pretrained(tmp_path)
    lm = load_model(tmp_path, device="cpu")
    assert [s.name for s in lm.sites] == [MORE[arch].format(i) for i in range(2)]
    assert all(s.from_checkpoint() and not s.conv1d for s in lm.sites)
    assert torch.equal(value_norms(lm, source="checkpoint"), value_norms(lm, source="modules"))


def test_checkpoint_norms_on_the_models_device(saved, device):
    """The model on ``device``: the streamed layers go there and the norms kernel runs there."""
    from specext.models.loading import value_norms

    lm = load_model(saved["llama"], device=device)
    got = value_norms(lm)
    assert got.device.type == device and all(s.from_checkpoint() for s in lm.sites)
    torch.testing.assert_close(got.cpu(), value_norms(lm, device="cpu", source="modules"), rtol=1e-6, atol=0)
