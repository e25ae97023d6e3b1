"""The package's folders are its layers: each imports only the layers before it
(docs/DESIGN-NOTES.md, "Package map"), and the README's public paths keep working."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "specext"
ALLOWED = {
    "kernels": {"kernels"},
    "models": {"kernels", "models"},
    "probes": {"kernels", "models", "probes"},
    "metrics": {"kernels", "models", "probes", "metrics"},
    "report": {"report", "pipelines.rundir"},
    "pipelines": {"kernels", "models", "probes", "metrics", "report", "pipelines"},
}
TOP = {"_deps", "_options", "_progress", "_native", "__version__", "build_info", "_ext", "set_num_threads", "set_simd_level"}


def _imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                yield node.lineno, "(relative import)"
            elif node.module and (node.module == "specext" or node.module.startswith("specext.")):
                if node.module == "specext":
                    for a in node.names:
                        yield node.lineno, "specext." + a.name
                else:
                    for a in node.names:
                        yield node.lineno, f"{node.module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("specext"):
                    yield node.lineno, a.name


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folders_import_only_earlier_layers(folder):
    bad = []
    for f in sorted((PKG / folder).glob("*.py")):
        for line, mod in _imports(f):
            parts = mod.split(".")
            if mod == "(relative import)":
                bad.append(f"{f.name}:{line}: relative import (use specext.<layer>.<module>)")
                continue
            if len(parts) < 2 or parts[1] in TOP:
                continue
            layer, sub = parts[1], ".".join(parts[1:3])
            if layer not in ALLOWED[folder] and sub not in ALLOWED[folder]:
                bad.append(f"{f.name}:{line}: imports {mod}")
    assert not bad, f"{folder}/ may import {sorted(ALLOWED[folder])} only:\n" + "\n".join(bad)


def test_every_module_lives_in_a_layer():
    top = sorted(p.stem for p in PKG.glob("*.py"))
    assert top == ["__init__", "_deps", "_options", "_progress", "analyze", "compare", "finetune", "ops", "reference", "weights"]


def test_public_paths_are_the_real_modules():
    import specext.analyze
    import specext.compare
    import specext.finetune
    import specext.ops
    import specext.reference
    import specext.weights
    from specext.kernels import ops, reference, weights
    from specext.pipelines import analyze, compare, finetune

    assert specext.ops is ops and specext.reference is reference and specext.weights is weights
    assert specext.analyze is analyze and specext.compare is compare and specext.finetune is finetune
    from specext.analyze import AnalyzeConfig, run_analysis  # the README's notebook entry point

    assert callable(run_analysis) and AnalyzeConfig.__module__ == "specext.pipelines.run"


@pytest.mark.parametrize("cli", ["specext.analyze", "specext.compare", "specext.finetune"])
def test_command_lines_run_under_python_m(cli):
    r = subprocess.run([sys.executable, "-m", cli, "--help"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert f"usage: python -m {cli}" in r.stdout
