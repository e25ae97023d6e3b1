"""Every snippet in README.md and bench/README.md works as pasted: each ```python block runs
(``>>>`` blocks: their input lines), and each shell command names files that exist, runs
specext from ``.venv/bin/`` (never a bare ``python``), and passes only options that the
command's ``--help`` lists."""

import functools
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "bench/README.md"]


def blocks(lang):
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for m in re.finditer(r"^```(\w+)\n(.*?)^```", text, re.S | re.M):
            if m.group(1) == lang:
                line = text[: m.start()].count("\n") + 1
                out.append(pytest.param(m.group(2), id=f"{doc}:{line}"))
    return out


def _env():
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


@pytest.mark.parametrize("code", blocks("python"))
def test_python_snippet_runs(code):
    lines = code.splitlines()
    if any(l.startswith(">>> ") for l in lines):  # an interactive session: its input lines
        code = "\n".join(l[4:] for l in lines if l.startswith((">>> ", "... ")))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=_env(),
                       timeout=600)
    assert r.returncode == 0, f"snippet failed:\n{code}\n--- stderr:\n{r.stderr[-3000:]}"


def commands():
    out = []
    for p in blocks("bash"):
        text = p.values[0].replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if line and not line.startswith("#"):
                for part in line.split("&&"):
                    out.append(pytest.param(part.strip(), id=f"{p.id}:{part.strip()[:40]}"))
    return out


@functools.lru_cache(maxsize=None)
def help_text(*cmd):
    r = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, cwd=ROOT, env=_env(),
                       timeout=300)
    assert r.returncode == 0, f"{' '.join(cmd)} --help failed: {r.stderr[-2000:]}"
    return r.stdout


def _check_options(target, args):
    text = help_text(*target)
    for a in args:
        opt = a.split("=")[0]
        if opt.startswith("-") and opt != "-":
            assert re.search(rf"(^|[\s,\[]){re.escape(opt)}([\s,=\]]|$)", text, re.M), \
                f"{' '.join(target)} has no option {opt} (README command uses it)"


@pytest.mark.parametrize("cmd", commands())
def test_shell_command(cmd):
    words = shlex.split(cmd)
    prog = words[0]
    if prog == "pip":  # the Install section: into an environment of the user's own
        return
    assert not prog.startswith(("python", "torchrun")), \
        f"{cmd!r}: a bare {prog} has no specext unless .venv is activated; write .venv/bin/{prog}"
    if prog == "bash":
        assert (ROOT / words[1]).is_file(), words[1]
        return
    assert prog in (".venv/bin/python", ".venv/bin/torchrun"), cmd
    if "-m" in words:
        mod = words[words.index("-m") + 1]
        assert mod.startswith("specext.") or mod == "pytest", cmd
        rest = words[words.index("-m") + 2:]
        _check_options(("-m", mod), rest)
    else:
        script = words[1]
        assert (ROOT / script).is_file(), f"{script} does not exist"
        _check_options((script,), words[2:])


def test_readme_names_files_that_exist():
    text = (ROOT / "README.md").read_text()
    for path in set(re.findall(r"`((?:scripts|bench|docs|tests|csrc|python)/[\w./-]+)`", text)):
        if "FILE" in path or "*" in path:
            continue
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
