"""``--help`` of every CLI (analyze, finetune, compare): every option has help text, states
its default at most once, never ``None``, and the defaults it states are the ones the parser
uses."""

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from specext.pipelines.analyze import DEMO_PSS_CONCEPTS, build_parser

ROOT = Path(__file__).resolve().parents[1]


def _parsers():
    from specext.pipelines import compare, finetune

    return {"analyze": build_parser, "finetune": finetune.build_parser, "compare": compare.build_parser}


def _actions(cli="analyze"):
    p = _parsers()[cli]()
    return p, [a for a in p._actions if not isinstance(a, argparse._HelpAction)]


@pytest.mark.parametrize("cli", ["analyze", "finetune", "compare"])
def test_every_option_has_help_and_one_default_statement(cli):
    p, actions = _actions(cli)
    fmt = p._get_formatter()
    for a in actions:
        name = a.option_strings[-1] if a.option_strings else a.dest
        assert a.help and a.help is not argparse.SUPPRESS and len(a.help) > 10, f"{name} has no help text"
        shown_help = fmt._expand_help(a) if a.help else ""  # as --help prints it (a formatter may add the default)
        assert shown_help.count("default") <= 1, f"{name} states its default twice: {shown_help!r}"
        assert "None" not in shown_help, f"{name}: {shown_help!r}"
        valued = a.nargs != 0 and a.option_strings  # takes a value (not a flag)
        if valued and a.default is not None:
            m = re.search(r"\(default:? ([^)]*)\)", shown_help)
            assert m, f"{name} takes a value with default {a.default!r} but does not say so: {shown_help!r}"
            shown = m.group(1).split(";")[0].split(",")[0].strip()
            default = a.default if not isinstance(a.default, float) else f"{a.default:g}"
            shown = shown if not re.fullmatch(r"[0-9.e+-]+", shown) else f"{float(shown):g}"
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
