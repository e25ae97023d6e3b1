"""--resume checks the weights' bytes (not only the safetensors headers) and that every saved
row is the probe's question at its index (issue 13 item 2)."""

import json
import shutil
import signal

import torch
from safetensors.torch import load_file, save_file

import tiny_models as T
from specext.pipelines import rundir
from test_analyze import make_probe, run_cli


def _args(model, probe, out):
    return [model, "--probe", probe, "--device", "cpu", "--batch-size", "3", "--chunk-size", "5", "-q",
            "--no-report", "--checkpoint-every", "0", "--out", out]


def test_resume_refuses_same_header_other_weights(tmp_path):
    model = T.save_tiny("llama", tmp_path / "m", seed=1)
    probe = make_probe(tmp_path / "probe.jsonl")
    out = tmp_path / "run"
    r = run_cli(_args(model, probe, out), kill_at=("scoring", 1))
    assert r.returncode == -signal.SIGKILL
    # a "fine-tune": the same tensors (names, shapes, dtypes), one value changed
    f = next(model.glob("*.safetensors"))
    head = f.read_bytes()[: 8 + int.from_bytes(f.read_bytes()[:8], "little")]
    w = load_file(str(f))
    k = sorted(w)[-1]
    w[k] = w[k].clone()
    w[k].view(-1)[0] += 1.0
    save_file(w, str(f), metadata={"format": "pt"})
    assert f.read_bytes()[: len(head)] == head  # the header did not change
    r = run_cli(_args(model, probe, out) + ["--resume"])
    assert r.returncode == 2, r.stderr
    assert "weights_sha256 differ" in r.stderr and "model's weights differ" in r.stderr


def test_weights_hash_is_cached(tmp_path, monkeypatch):
    model = T.save_tiny("llama", tmp_path / "m", seed=1)
    files = sorted(model.glob("*.safetensors"))
    cache = tmp_path / "run" / rundir.WEIGHTS_CACHE
    cache.parent.mkdir()
    calls = []
    real = rundir.sha256_file
    monkeypatch.setattr(rundir, "sha256_file", lambda p, *a, **kw: calls.append(p) or real(p, *a, **kw))
    fp1 = rundir.weights_fingerprint(files, cache)
    assert len(calls) == len(files) and cache.is_file()
    entry = json.loads(cache.read_text())[str(files[0].resolve())]
    assert entry["size"] == files[0].stat().st_size and entry["mtime_ns"] == files[0].stat().st_mtime_ns
    calls.clear()
    assert rundir.weights_fingerprint(files, cache) == fp1 and calls == []  # no rehash
    # a changed file (new bytes, new mtime) is hashed again and the fingerprint changes
    w = load_file(str(files[0]))
    k = sorted(w)[0]
    w[k] = w[k] + 1
    save_file(w, str(files[0]), metadata={"format": "pt"})
    fp2 = rundir.weights_fingerprint(files, cache)
    assert len(calls) == 1 and fp2 != fp1
    # the full fingerprint of a real run stores it: a resume does not rehash
    out = tmp_path / "run2"
    r = run_cli(_args(model, make_probe(tmp_path / "probe.jsonl"), out), kill_at=("scoring", 0))
    assert r.returncode == -signal.SIGKILL and (out / rundir.WEIGHTS_CACHE).is_file()
    prog = json.loads((out / ".state" / "progress.json").read_text())
    assert prog["fingerprint"]["weights_sha256"] == fp2
    calls.clear()
    assert rundir.weights_fingerprint(files, out / rundir.WEIGHTS_CACHE) == fp2 and calls == []


def test_resume_refuses_rows_of_another_probe(tmp_path):
    model = T.save_tiny("llama", tmp_path / "m", seed=1)
    probe = make_probe(tmp_path / "probe.jsonl")
    other = tmp_path / "other.jsonl"
    other.write_text(probe.read_text().replace("What is fact", "Which is fact"))
    a, b = tmp_path / "a", tmp_path / "b"
    for p, out in ((probe, a), (other, b)):
        r = run_cli(_args(model, p, out), kill_at=("scoring", 1))
        assert r.returncode == -signal.SIGKILL
    own = (a / ".state" / "rows.jsonl").read_text()
    shutil.copy(b / ".state" / "rows.jsonl", a / ".state" / "rows.jsonl")  # another probe's rows
    r = run_cli(_args(model, probe, a) + ["--resume"])
    assert r.returncode == 2, r.stderr
    assert "row 1 of" in r.stderr and "does not belong to question 0 of the probe" in r.stderr
    # rows in another order (a concept's rows swapped) are refused too
    rows = own.splitlines()
    rows[2], rows[7] = rows[7], rows[2]
    (a / ".state" / "rows.jsonl").write_text("".join(r + "\n" for r in rows))
    r = run_cli(_args(model, probe, a) + ["--resume"])
    assert r.returncode == 2 and "row 3 of" in r.stderr, r.stderr
    # the probe's own rows resume
    (a / ".state" / "rows.jsonl").write_text(own)
    r = run_cli(_args(model, probe, a) + ["--resume"])
    assert r.returncode == 0, r.stderr
