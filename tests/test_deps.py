"""A missing optional dependency is a one-line error naming the extra that brings it."""

import subprocess
import sys

import pytest

from specext._deps import require


def test_missing_module_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import of it now fails
    with pytest.raises(ImportError, match=r"^specext.compare needs matplotlib, which is not installed: "
                                          r"pip install 'specext\[analyze\]'$"):
        require("matplotlib", what="specext.compare")
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="install the torch build you want first"):
        require("torch", what="x")


def test_cli_without_transformers_says_which_extra():
    code = ("import sys; sys.modules['transformers'] = None; sys.argv = ['x', '--demo']\n"
            "import runpy; runpy.run_module('specext.analyze', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode != 0
    assert "python -m specext.analyze needs transformers, which is not installed: pip install 'specext[analyze]'" in r.stderr


def test_kernels_import_without_the_analysis_extras():
    code = ("import sys\n"
            "for m in ('transformers', 'tokenizers', 'matplotlib', 'tqdm'): sys.modules[m] = None\n"
            "import numpy as np\n"
            "from specext import ops, reference, weights\n"
            "s, c = ops.category_accumulate(np.ones((4, 3), np.float32), np.array([0, 1, 1, 0]), 2)\n"
            "print(s.tolist(), c.tolist())")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]] [2.0, 2.0]"


def test_analyze_cli_needs_matplotlib_only_for_the_report(tmp_path):
    # the GPU check runs `analyze --no-report` where matplotlib may be missing: the CLI must import
    # without it, and a run with the report must stop at once saying how to go without it
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from specext import analyze\n"
            "sys.exit(analyze.main(['--demo', '--out', sys.argv[1], '-q']))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert r.returncode == 2, r.stderr
    assert "run_analysis needs matplotlib, which is not installed" in r.stderr and "--no-report" in r.stderr
