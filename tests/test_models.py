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
