"""Device-correctness lint: the analysis must run with its tensors on a GPU, where a host
read of a device tensor either crashes (``.numpy()``) or synchronises (``.item()``,
``.tolist()``, ``int()/float()/bool()`` of an element). This machine has no GPU, so the
check is over the sources (docs/DESIGN-NOTES.md, "Device correctness", says what it
covers). Rules, for the modules that run during an analysis:

1. ``.numpy()`` only directly on ``.cpu()`` (``x.cpu().numpy()``): ``(top // D).numpy()`` on
   a CUDA tensor was a crash of ``analyze`` with PSS on every GPU;
2. ``.item()`` and ``.tolist()`` only on ``.cpu()`` or on a line that says why the read is
   wanted (a ``# host:`` comment: e.g. once per batch, by design);
3. no ``int()``, ``float()`` or ``bool()`` of an indexed element inside a loop (one
   synchronisation per element, as greedy decoding once read ``done[b]``/``nxt[b]``):
   read the whole tensor once, outside the loop.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "python" / "specext"
MODULES = sorted(str(p.relative_to(PKG)) for d in ("models", "probes", "metrics", "pipelines", "report")
                 for p in (PKG / d).glob("*.py") if p.name != "__init__.py")


def _on_cpu(node: ast.AST) -> bool:
    """``x.cpu()`` / ``x.detach().cpu()`` / ``x.to("cpu")`` as the receiver."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr == "cpu":
            return True
        if node.func.attr == "to" and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == "cpu":
            return True
    return False


def violations(source: str, name: str = "<src>"):
    tree = ast.parse(source)
    lines = source.splitlines()
    out = []

    def justified(node):
        return "# host:" in lines[node.lineno - 1] or (
            node.end_lineno and "# host:" in lines[node.end_lineno - 1])

    loops = []

    def visit(node, in_loop):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            attr, recv = node.func.attr, node.func.value
            if attr == "numpy" and not node.args and not _on_cpu(recv):
                out.append(f"{name}:{node.lineno}: .numpy() not directly on .cpu()")
            if attr in ("item", "tolist") and not node.args and not _on_cpu(recv) and not justified(node):
                out.append(f"{name}:{node.lineno}: .{attr}() of a possibly-device tensor without a '# host:' reason")
        if (in_loop and isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("int", "float", "bool") and node.args and isinstance(node.args[0], ast.Subscript)
                and not justified(node)):
            out.append(f"{name}:{node.lineno}: {node.func.id}() of an element inside a loop (one read per element)")
        for child in ast.iter_child_nodes(node):
            visit(child, in_loop or isinstance(node, (ast.For, ast.While, ast.comprehension, ast.ListComp,
                                                       ast.GeneratorExp, ast.DictComp, ast.SetComp)))

    visit(tree, False)
    return out


@pytest.mark.parametrize("module", MODULES)
def test_no_unsafe_host_reads(module):
    bad = violations((PKG / module).read_text(), module)
    assert not bad, "host reads of tensors that may live on a GPU:\n" + "\n".join(bad)


def test_the_lint_catches_what_crashed_and_what_synchronised():
    crash = "layer_hist += np.bincount((top // D).numpy(), minlength=L)\n"
    assert violations(crash) and not violations("x = np.bincount((top // D).cpu().numpy())\n")
    per_element = "for b in range(B):\n    if not done[b]:\n        t = int(nxt[b])\n"
    assert len(violations(per_element)) == 1
    assert violations("v = t.item()\n") and not violations("v = t.item()  # host: once per run\n")
    assert violations("s = (a + b).tolist()\n") and not violations("s = a.cpu().tolist()\n")
