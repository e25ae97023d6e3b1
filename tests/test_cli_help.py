"""``python -m specext.analyze --help``: every option has help text, states its default at
most once, never ``None``, and the defaults it states are the ones the parser uses."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

from specext.pipelines.analyze import DEMO_PSS_CONCEPTS, build_parser

ROOT = Path(__file__).resolve().parents[1]


def _actions():
    p = build_parser()
    return p, [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


def test_every_option_has_help_and_one_default_statement():
    _, actions = _actions()
    for a in actions:
        name = a.option_strings[-1] if a.option_strings else a.dest
        assert a.help and a.help is not argparse.SUPPRESS and len(a.help) > 10, f"{name} has no help text"
        assert a.help.count("default") <= 1, f"{name} states its default twice: {a.help!r}"
        assert "None" not in a.help, f"{name}: {a.help!r}"
        valued = a.nargs != 0 and a.option_strings  # takes a value (not a flag)
        if valued and a.default is not None:
            m = re.search(r"\(default: ([^)]*)\)", a.help)
            assert m, f"{name} takes a value with default {a.default!r} but does not say so: {a.help!r}"
            shown = m.group(1).split(";")[0].split(",")[0].strip()
            default = a.default if not isinstance(a.default, float) else f"{a.default:g}"
            assert str(default).startswith(shown), f"{name}: help says default {shown!r}, parser uses {a.default!r}"


def test_help_output_is_clean():
    r = subprocess.run([sys.executable, "-m", "specext.analyze", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "(default: None)" not in out and ") (default:" not in out
    # --pss-concepts says what --demo uses; --random-twin says when it is on
    pss = out[out.index("--pss-concepts N "):]
    assert f"{DEMO_PSS_CONCEPTS} with --demo" in " ".join(pss[:300].split())
    for opt in ("--overwrite", "--batch-size", "--dtype", "--seed", "--max-new-tokens", "--pss-selection",
                "--pss-metric"):
        assert opt in out


def test_demo_uses_what_help_says(monkeypatch):
    import specext.pipelines.analyze as an

    seen = {}

    def fake_run(cfg, **kw):
        seen["cfg"] = cfg
        raise ValueError("stop here")

    monkeypatch.setattr(an, "run_analysis", fake_run)
    assert an.main(["--demo", "-q"]) == 2
    cfg = seen["cfg"]
    assert cfg.pss_config.concepts == DEMO_PSS_CONCEPTS and cfg.random_twin and cfg.probe == "synthetic"
    assert Path(cfg.out) == Path("specext-runs") / "demo" and cfg.overwrite  # the demo's own folder is replaced
    assert an.main(["--demo", "-q", "--out", "x"]) == 2 and not seen["cfg"].overwrite  # a folder of yours is not
    assert an.main(["--demo", "-q", "--resume"]) == 2 and not seen["cfg"].overwrite and seen["cfg"].resume
