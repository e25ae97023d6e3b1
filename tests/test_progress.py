"""Progress when stderr is not a terminal (a log file, a pipe): plain lines, at most one per
30 s, no carriage returns; and kernel error messages without the build machine's path."""

import io
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import specext
from specext._progress import PlainProgress, progress

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_lines_at_most_every_30_s():
    out, clock = io.StringIO(), Clock()
    with PlainProgress(total=1000, desc="scoring", unit="q", file=out, interval=30, clock=clock) as bar:
        for _ in range(1000):
            clock.t += 0.1  # 100 s in all
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    # start, at 30, 60 and 90 s, and the end
    assert len(lines) == 5, lines
    assert lines[0] == "scoring: 0/1000 q (0%)"
    assert re.fullmatch(r"scoring: 300/1000 q \(30%\), 10 q/s, 1m10s left", lines[1]), lines[1]
    assert lines[-1] == "scoring: 1000/1000 q (100%), done in 1m40s"


def test_disabled_and_iterable():
    out, clock = io.StringIO(), Clock()
    assert list(PlainProgress(range(3), desc="train", file=out, clock=clock)) == [0, 1, 2]
    assert out.getvalue().splitlines()[-1] == "train: 3/3 it (100%), done in 0s"
    out = io.StringIO()
    with PlainProgress(total=5, file=out, disable=True) as bar:
        bar.update(5)
    assert out.getvalue() == ""


def test_a_pipe_gets_plain_lines_not_carriage_returns():
    code = ("import time\nfrom specext._progress import progress\n"
            "with progress(total=2000, desc='scoring', unit='q') as bar:\n"
            "    for _ in range(2000):\n        time.sleep(0.0002); bar.update(1)\n")
    env = dict(os.environ, SPECEXT_PROGRESS_INTERVAL="30")
    r = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                       cwd=ROOT, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("scoring: 0/2000 q") and "done in" in lines[1], lines


def test_terminal_gets_tqdm(monkeypatch):
    class TTY(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", TTY())
    bar = progress(total=3, desc="x")
    assert not isinstance(bar, PlainProgress)
    bar.close()


def test_kernel_errors_name_the_source_file_without_the_build_path():
    from specext import ops

    with pytest.raises(ValueError) as e:
        ops.category_accumulate(np.zeros((3, 4), np.float32), np.array([0, 1, 9]), 2)
    msg = str(e.value)
    m = re.search(r"\[([^\]]+):(\d+)\]$", msg)
    assert m, msg
    assert m.group(1) == "csrc/accumulate_cpu.cpp", msg  # the file, relative to the repository
    assert not os.path.isabs(m.group(1)) and "/tmp" not in msg and str(ROOT) not in msg


def test_set_simd_level_lists_the_valid_levels():
    avail = specext.build_info()["simd_available"]
    with pytest.raises(ValueError) as e:
        specext.set_simd_level("sse")
    msg = str(e.value)
    assert "'sse'" in msg and all(f"'{a}'" in msg for a in avail)
    # the extension itself says the same (its own message, with the source location)
    with pytest.raises(ValueError, match="valid levels on this CPU/build: 'scalar'"):
        specext._ext().set_simd_level("sse")


def test_run_analysis_hides_transformers_loading_bar_like_the_cli(tmp_path, capfd):
    """From a notebook (no CLI), transformers' weight-loading bar stays hidden; its own
    settings are restored afterwards."""
    import tiny_models as T
    from transformers.utils import logging as tl

    from specext.analyze import AnalyzeConfig, run_analysis
    from test_analyze import make_probe

    model = T.save_tiny("llama", tmp_path / "m", seed=1)
    probe = make_probe(tmp_path / "probe.jsonl")
    before = (tl.get_verbosity(), tl.is_progress_bar_enabled())
    capfd.readouterr()
    run_analysis(AnalyzeConfig(model_dir=str(model), probe=str(probe), out=str(tmp_path / "r"), device="cpu",
                               report=False, pss=False, open_ended=False, null_permutations=0), progress=False)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err
    assert (tl.get_verbosity(), tl.is_progress_bar_enabled()) == before


def test_plain_progress_shows_a_postfix_string():
    import io

    from specext._progress import PlainProgress

    f = io.StringIO()
    bar = PlainProgress(total=4, desc="fine-tuning runs", unit="run", file=f, interval=0.0)
    bar.set_postfix_str("FT-PV seed 1")
    bar.update(1)
    bar.close()
    lines = f.getvalue().splitlines()
    assert "\r" not in f.getvalue() and len(lines) == 3
    assert lines[1].startswith("fine-tuning runs: 1/4 run (25%)") and lines[1].endswith("FT-PV seed 1")
