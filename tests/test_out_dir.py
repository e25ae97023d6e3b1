"""A run directory never mixes two runs: a non-empty --out that is not a resumable run of the
same configuration is refused unless --overwrite, which clears only a specext run directory.
And MODEL_DIR is checked before the probe: a run directory passed as MODEL_DIR says so."""

import json

import pytest

import tiny_models as T
from specext.analyze import AnalyzeConfig, main, run_analysis
from specext.pipelines import rundir
from test_analyze import make_probe, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("out")
    return T.save_tiny("llama", d / "llama", seed=1), make_probe(d / "probe.jsonl")


def _args(model, probe, out, *more):
    return [str(model), "--probe", str(probe), "--device", "cpu", "-q", "--no-report", "--no-open", "--no-pss",
            "--null-permutations", "0", "--out", str(out), *more]


def test_rerun_into_a_finished_run_is_refused_then_overwritten(tmp_path, tiny, capsys):
    model, probe = tiny
    out = tmp_path / "run"
    assert main(_args(model, probe, out)) == 0
    first = json.loads((out / "summary.json").read_text())
    (out / "pss.csv").write_text("left over from another run\n")  # e.g. an earlier run with PSS
    capsys.readouterr()
    assert main(_args(model, probe, out, "--seed", "3")) == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--overwrite" in err
    assert json.loads((out / "summary.json").read_text()) == first  # untouched
    # --overwrite clears it first: nothing of the earlier run stays
    assert main(_args(model, probe, out, "--seed", "3", "--overwrite")) == 0
    assert not (out / "pss.csv").exists() and (out / "summary.json").is_file()
    assert json.loads((out / "config.json").read_text())["options"]["seed"] == 3
    # --resume on a finished run: nothing to resume
    capsys.readouterr()
    assert main(_args(model, probe, out, "--resume")) == 2
    assert "nothing to resume" in capsys.readouterr().err
    # --resume and --overwrite together is a contradiction
    assert main(_args(model, probe, out, "--resume", "--overwrite")) == 2


def test_a_folder_of_other_files_is_never_cleared(tmp_path, tiny, capsys):
    model, probe = tiny
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(_args(model, probe, out)) == 2
    assert "not a specext run directory" in capsys.readouterr().err
    assert main(_args(model, probe, out, "--overwrite")) == 2
    assert "refusing to delete" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_prepare_out_rules(tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    rundir.prepare_out(out)  # empty
    (out / ".lock").write_text("")
    (out / rundir.WEIGHTS_CACHE).write_text("{}")
    rundir.prepare_out(out)  # specext's bookkeeping only
    (out / ".state").mkdir()
    rundir.prepare_out(out, resume=True)  # killed before its first checkpoint: starts over
    (out / ".state" / "progress.json").write_text("{}")
    with pytest.raises(ValueError, match="unfinished run.*--resume"):
        rundir.prepare_out(out)
    rundir.prepare_out(out, resume=True)  # the fingerprint check follows in RunState.load
    rundir.prepare_out(out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == [".lock", rundir.WEIGHTS_CACHE]


def test_checkpoint_without_resume_is_refused(tmp_path, tiny):
    model, probe = tiny
    out = tmp_path / "killed"
    args = _args(model, probe, out, "--chunk-size", "5", "--checkpoint-every", "0")
    r = run_cli(args, kill_at=("scoring", 1))
    assert r.returncode < 0
    r = run_cli(args)
    assert r.returncode == 2 and "unfinished run" in r.stderr and "--resume" in r.stderr
    r = run_cli(args + ["--resume"])
    assert r.returncode == 0, r.stderr


def test_run_directory_as_model_dir(tmp_path, tiny, capsys):
    model, probe = tiny
    out = tmp_path / "run"
    assert main(_args(model, probe, out)) == 0
    capsys.readouterr()
    # checked before the probe is loaded: the probe here does not even exist
    assert main(_args(out, tmp_path / "no-such-probe.jsonl", tmp_path / "o2")) == 2
    err = capsys.readouterr().err
    assert "is a specext run directory" in err and str(model) in err and "no-such-probe" not in err
    assert "model_type" not in err  # not transformers' wording
    with pytest.raises(ValueError, match="specext run directory"):
        run_analysis(AnalyzeConfig(model_dir=str(out), probe=str(probe), out=str(tmp_path / "o3"), device="cpu"),
                     progress=False)
