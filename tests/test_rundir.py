"""The run directory under hostile conditions (issue 13, items 3, 6, 9, 10, 11): concurrent
runs on one --out, byte-reproducible outputs, a full disk, a read-only --out, resume of a
damaged checkpoint."""

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from specext.analyze import AnalyzeConfig, run_analysis
from specext.pipelines import compare, rundir, run as run_mod
from test_analyze import llama_dir, probe_file  # noqa: F401 (module fixtures: the tiny model and probe)


def cfg(llama_dir, probe_file, out, **kw):
    base = dict(model_dir=str(llama_dir), probe=str(probe_file), out=str(out), device="cpu", report=False,
                pss=False, null_permutations=2, open_ended=False, chunk_size=12, checkpoint_every=0)
    return AnalyzeConfig(**{**base, **kw})


# ---------------------------------------------------------------------------- 3: lock


def test_second_run_on_same_out_is_refused_naming_the_holder(tmp_path, llama_dir, probe_file, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    held = rundir.RunLock(out).acquire()  # another run holds the directory (flock: per open file)
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("model loaded despite the lock"))
    with pytest.raises(ValueError, match=rf"in use by another specext run \(process id {os.getpid()}"):
        run_analysis(cfg(llama_dir, probe_file, out), progress=False)
    assert not (out / ".state").exists()
    held.release()


def test_stale_lock_is_taken_over_and_released(tmp_path, llama_dir, probe_file, caplog):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text("999999999\n")  # a killed run's lock file: its pid, no flock held
    with caplog.at_level(logging.WARNING, logger="specext.analyze"):
        run_analysis(cfg(llama_dir, probe_file, out), progress=False)
    assert "stale lock of process 999999999" in caplog.text
    assert (out / "summary.json").is_file() and (out / ".lock").read_text() == ""  # released
    rundir.RunLock(out).acquire().release()  # free again


# ---------------------------------------------------------------------------- 6: same bytes


def test_identical_runs_write_identical_bytes(tmp_path, llama_dir, probe_file):
    for name in ("a", "b"):
        run_analysis(cfg(llama_dir, probe_file, tmp_path / name, null_permutations=4), progress=False)
    a, b = tmp_path / "a", tmp_path / "b"
    for f in ("neurons.safetensors", "mass.safetensors", "questions.jsonl", "concepts.csv"):
        assert (a / f).read_bytes() == (b / f).read_bytes(), f
    sa, sb = json.loads((a / "summary.json").read_text()), json.loads((b / "summary.json").read_text())
    sa.pop("seconds"), sb.pop("seconds")
    assert sa == sb
    # config.json differs in the options' --out and the memory plan's free memory/disk (no timings)
    ca, cb = json.loads((a / "config.json").read_text()), json.loads((b / "config.json").read_text())
    for c in (ca, cb):
        c["options"].pop("out"), c.pop("memory_plan")
    assert ca == cb


def test_safetensors_metadata_order_is_fixed(tmp_path):
    import torch

    meta = {f"k{i}": str(i) for i in range(32)}
    for name in ("a", "b", "c"):
        rundir.write_safetensors(tmp_path / name, {"y": torch.zeros(3), "x": torch.ones(2, dtype=torch.int64)}, meta)
    assert len({(tmp_path / n).read_bytes() for n in "abc"}) == 1
    from safetensors import safe_open

    with safe_open(str(tmp_path / "a"), "pt") as f:
        assert f.metadata() == meta and f.get_tensor("x").tolist() == [1, 1]


# ---------------------------------------------------------------------------- 9: full disk


def _fail_fsync_of(monkeypatch, name):
    real = os.fsync

    def fsync(fd):
        if name in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(rundir.os, "fsync", fsync)


@pytest.mark.parametrize("victim", ["neurons.safetensors", "report.html"])
def test_full_disk_names_the_file_leaves_no_tmp_and_compare_refuses(tmp_path, llama_dir, probe_file, monkeypatch,
                                                                     victim):
    out = tmp_path / "run"
    run_analysis(cfg(llama_dir, probe_file, out), progress=False)  # an earlier complete run in the same --out
    _fail_fsync_of(monkeypatch, victim)
    with pytest.raises(OSError, match=rf"cannot write .*{victim}: No space left on device"):
        run_analysis(cfg(llama_dir, probe_file, out, report=victim == "report.html", overwrite=True), progress=False)
    assert not [p.name for p in out.rglob("*") if ".tmp" in p.name]
    assert not (out / "summary.json").exists()  # written last; the earlier run's cleared at the start (--overwrite)
    with pytest.raises(ValueError, match="incomplete run directory"):
        compare.load_run(out)
    assert compare.main([str(out), "--out", str(tmp_path / "cmp")]) != 0


def test_summary_is_written_last(tmp_path, llama_dir, probe_file, monkeypatch):
    order = []
    real = rundir.write_bytes
    monkeypatch.setattr(rundir, "write_bytes", lambda p, d: (order.append(Path(p).name), real(p, d)))
    run_analysis(cfg(llama_dir, probe_file, tmp_path / "r", report=True), progress=False)
    assert "report.html" in order and order[-1] == "summary.json"


# ---------------------------------------------------------------------------- 10: read-only --out


def test_unwritable_out_fails_before_loading_the_model(tmp_path, llama_dir, probe_file, monkeypatch):
    monkeypatch.setattr(run_mod, "load_model", lambda *a, **k: pytest.fail("model loaded before the --out check"))
    (tmp_path / "file").write_text("")
    with pytest.raises(OSError, match="is not a writable directory"):
        run_analysis(cfg(llama_dir, probe_file, tmp_path / "file" / "run"), progress=False)
    ro = tmp_path / "ro"
    ro.mkdir()
    real_open = open

    def read_only_open(path, mode="r", *a, **k):  # root ignores chmod: a read-only filesystem by hand
        if str(path).startswith(str(ro)) and any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", read_only_open)
    with pytest.raises(OSError, match=rf"--out {ro} is not a writable directory: Read-only file system"):
        run_analysis(cfg(llama_dir, probe_file, ro), progress=False)


# ---------------------------------------------------------------------------- 11: damaged resume


class _Killed(Exception):
    pass


def _killed_run(llama_dir, probe_file, out):
    def kill(stage, k):
        if stage == "scoring" and k == 1:
            raise _Killed

    with pytest.raises(_Killed):
        run_analysis(cfg(llama_dir, probe_file, out), progress=False, on_checkpoint=kill)
    st = out / ".state"
    assert json.loads((st / "progress.json").read_text())["rows"] == 24
    return st


def _short_rows(st):
    lines = (st / "rows.jsonl").read_text().splitlines(keepends=True)
    (st / "rows.jsonl").write_text("".join(lines[:20]))
    return "rows.jsonl"


def _cut_accum(st):
    p = next(st.glob("accum-*.safetensors"))
    p.write_bytes(p.read_bytes()[:-100])
    return p.name


def _bad_progress(st):
    p = st / "progress.json"
    p.write_text(p.read_text()[:40])
    return "progress.json"


@pytest.mark.parametrize("damage", [_short_rows, _cut_accum, _bad_progress], ids=["rows", "accumulators", "progress"])
def test_resume_of_damaged_checkpoint_names_the_file(tmp_path, llama_dir, probe_file, damage):
    out = tmp_path / "run"
    st = _killed_run(llama_dir, probe_file, out)
    name = damage(st)
    with pytest.raises(ValueError, match=rf"{name}.* damaged.*rerun with --overwrite instead of --resume"):
        run_analysis(cfg(llama_dir, probe_file, out, resume=True), progress=False)
    run_analysis(cfg(llama_dir, probe_file, out, overwrite=True), progress=False)  # the advice works
    assert (out / "summary.json").is_file() and not st.exists()


def test_fingerprint_changes_name_hashed_inputs_and_each_option_once():
    from specext.pipelines.rundir import fingerprint_changes

    old = {"options": {"seed": 0, "pss": {"seed": 0, "ratios": [1.0]}}, "model_config_sha256": "a", "weights_sha256": "b"}
    new = {"options": {"seed": 3, "pss": {"seed": 3, "ratios": [1.0]}}, "model_config_sha256": "c", "weights_sha256": "b"}
    got = fingerprint_changes(old, new)
    assert got.count("--seed: 0 in the checkpoint, 3 now") == 1, got  # seed and pss.seed: one option
    assert "model_config_sha256: MODEL_DIR's config.json differs from the checkpoint's (another model, or an " \
           "edited config)" in got
    assert len(got) == 2


def test_resume_layout_one_process_versus_ranks(tmp_path):
    """A checkpoint of N torchrun ranks cannot be resumed by one process or by M != N ranks
    (and the other way round): refused before anything runs, naming the counts."""
    import json

    from specext.pipelines.rundir import RunState

    def write(d, world=None):
        d.mkdir(parents=True, exist_ok=True)
        fp = {"options": {}} | ({"world_size": world} if world else {})
        (d / "progress.json").write_text(json.dumps({"rows": 0, "accumulators": "a", "next_question": 0,
                                                     "fingerprint": fp}))

    out = tmp_path / "ranks"
    write(out / ".state" / "rank-0", 2)
    write(out / ".state" / "rank-1", 2)
    st = RunState(out)
    assert "was written by 2 torchrun ranks (rank-0, rank-1); resume it with torchrun --nproc_per_node 2" in \
        st.layout_problem(None)
    assert st.layout_problem(2) is None
    assert "written by 2 torchrun ranks (rank-0, rank-1), this run has 3" in st.layout_problem(3)
    write(out / ".state" / "rank-2", 3)  # left by a refused 3-rank attempt
    assert "of different counts" in st.layout_problem(2)
    single = tmp_path / "single"
    write(single / ".state")
    assert "written by one process (no torchrun); resume it without torchrun" in RunState(single).layout_problem(2)
    assert RunState(single).layout_problem(None) is None
    assert RunState(tmp_path / "none").layout_problem(2) is None
