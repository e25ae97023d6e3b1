"""--dtype auto on a CPU: a bfloat16 checkpoint runs in float32 where the CPU has no native
bfloat16 arithmetic and float32 fits in memory, says so and records it; running out of
memory while loading is a clear error with sizes and options, not a traceback."""

import json

import pytest
import torch

import tiny_models as T
from specext.analyze import AnalyzeConfig, main, run_analysis
from specext.models import loading
from specext.models.loading import ModelLoadError, choose_dtype, load_model
from test_analyze import make_probe

GiB = 2**30


@pytest.fixture(scope="module")
def bf16_dir(tmp_path_factory):
    d = T.save_tiny("llama", tmp_path_factory.mktemp("bf16") / "llama", seed=1, dtype=torch.bfloat16)
    assert json.loads((d / "config.json").read_text()).get("dtype") == "bfloat16"
    return d


def test_choose_dtype(monkeypatch):
    monkeypatch.setattr(loading, "cpu_native_dtype", lambda dt: False)
    c = choose_dtype("auto", torch.bfloat16, True, numel=10**9, available=64 * GiB)
    assert c["used"] == "float32" and c["checkpoint"] == "bfloat16" and "no native bfloat16" in c["reason"]
    assert "3.7 GiB" in c["reason"]  # what float32 needs
    # does not fit: kept, and said why
    c = choose_dtype("auto", torch.bfloat16, True, numel=10**10, available=16 * GiB)
    assert c["used"] == "bfloat16" and "kept" in c["reason"] and "37.3 GiB" in c["reason"]
    # native bf16 arithmetic, a GPU, an explicit --dtype, a float32 checkpoint: unchanged
    assert choose_dtype("auto", torch.bfloat16, False, 10**9, None)["used"] == "bfloat16"
    assert choose_dtype("bfloat16", torch.bfloat16, True, 10**9, 64 * GiB)["used"] == "bfloat16"
    assert choose_dtype("auto", torch.float32, True, 10**9, 64 * GiB)["used"] == "float32"
    monkeypatch.setattr(loading, "cpu_native_dtype", lambda dt: True)
    c = choose_dtype("auto", torch.bfloat16, True, 10**9, 64 * GiB)
    assert c["used"] == "bfloat16" and "natively" in c["reason"]


def test_cpu_native_dtype_reads_the_flags(monkeypatch):
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "avx512f"})
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    assert loading.cpu_native_dtype(torch.bfloat16) is False
    monkeypatch.setattr(loading, "cpu_flags", lambda: {"avx2", "avx512f", "avx512_bf16"})
    assert loading.cpu_native_dtype(torch.bfloat16) is True and loading.cpu_native_dtype(torch.float16) is False
    monkeypatch.setattr(loading, "cpu_flags", lambda: None)
    assert loading.cpu_native_dtype(torch.bfloat16) is None


def test_auto_loads_float32_without_bf16_and_records_it(tmp_path, bf16_dir, monkeypatch, caplog):
    monkeypatch.setattr(loading, "cpu_native_dtype", lambda dt: False)
    caplog.set_level("INFO")
    lm = load_model(bf16_dir, device="cpu")
    assert lm.dtype == torch.float32 and lm.dtype_choice["used"] == "float32"
    assert any("dtype float32" in r.getMessage() and "no native bfloat16" in r.getMessage() for r in caplog.records)
    # the whole run: summary.json and config.json say which dtype and why
    probe = make_probe(tmp_path / "probe.jsonl")
    s = run_analysis(AnalyzeConfig(model_dir=str(bf16_dir), probe=str(probe), out=str(tmp_path / "r"), device="cpu",
                                   report=False, pss=False, open_ended=False, null_permutations=0), progress=False)
    assert s["dtype"]["requested"] == "auto" and s["dtype"]["used"] == "float32"
    assert s["dtype"]["checkpoint"] == "bfloat16" and "no native bfloat16" in s["dtype"]["reason"]
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["model"]["dtype"] == "torch.float32" and cfg["fingerprint"]["model_dtype"] == "float32"
    # with native bf16 arithmetic (or --dtype bfloat16) it stays bfloat16
    monkeypatch.setattr(loading, "cpu_native_dtype", lambda dt: True)
    assert load_model(bf16_dir, device="cpu").dtype == torch.bfloat16
    monkeypatch.setattr(loading, "cpu_native_dtype", lambda dt: False)
    assert load_model(bf16_dir, device="cpu", dtype="bfloat16").dtype == torch.bfloat16


def test_auto_keeps_bf16_when_float32_does_not_fit(bf16_dir, monkeypatch, caplog):
    monkeypatch.setattr(loading, "cpu_native_dtype", lambda dt: False)
    monkeypatch.setattr(loading, "host_memory_available", lambda: 1000)  # bytes
    caplog.set_level("INFO")
    lm = load_model(bf16_dir, device="cpu")
    assert lm.dtype == torch.bfloat16 and "kept" in lm.dtype_choice["reason"]
    assert any(r.levelname == "WARNING" and "kept the checkpoint's bfloat16" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("exc", [
    RuntimeError("unable to mmap 1048576 bytes from file </m/model.safetensors>: Cannot allocate memory (12)"),
    MemoryError(),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_out_of_memory_while_loading(tmp_path, bf16_dir, monkeypatch, capsys, exc):
    import transformers

    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(ModelLoadError) as e:
        load_model(bf16_dir, device="cpu", dtype="float32")
    msg = str(e.value)
    assert "out of memory while loading" in msg and "need about" in msg and "is free" in msg
    assert "--dtype bfloat16" in msg and "--device-map auto" in msg and "--offload-dir" in msg
    # the command line: a one-line error and exit 2, no traceback
    probe = make_probe(tmp_path / "probe.jsonl")
    rc = main([str(bf16_dir), "--probe", str(probe), "--out", str(tmp_path / "o"), "--device", "cpu", "-q",
               "--dtype", "float32"])
    err = capsys.readouterr().err
    assert rc == 2 and "out of memory while loading" in err and "Traceback" not in err


def test_other_load_errors_are_not_called_out_of_memory(bf16_dir, monkeypatch):
    import transformers

    def boom(*a, **k):
        raise RuntimeError("size mismatch for model.layers.0.mlp.down_proj.weight")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_model(bf16_dir, device="cpu")
