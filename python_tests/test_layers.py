"""The package's layers (lopt_ext/base.py): every import of a core module, at the top or inside
a function, goes to a lower layer, so the core reads top-down and has no import circle."""
import ast
import pathlib

import pytest

PKG = pathlib.Path(__file__).resolve().parents[1] / "lopt_ext"
# rank: a module may import lopt_ext modules of strictly lower rank only
RANKS = {
    "_lopt_cpu": -1, "_lopt_cuda": -1,                 # the compiled kernels
    "protocol": 0, "common": 0, "_ffi": 0,             # rule protocol, shared pieces, kernel binding
    "state": 1, "update": 2, "optax_api": 3,           # machinery written against the protocol
    "base": 4,                                         # LearnedOptimizer = protocol + transform
    "reference": 5, "config": 6,                       # one module per learned optimizer
    "scaled": 7, "mlp_lopt": 7, "celo": 7,
}
OUTER = 10  # everything else (variants, checkpoint, sharded, pretrained, tasks, metatrain, CLI)


def _imports(path):
    """lopt_ext submodules a file imports (first component after lopt_ext.)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            parts = node.module.split(".")
            if parts[0] != "lopt_ext":
                continue
            if len(parts) > 1:
                found.add(parts[1])
            else:  # from lopt_ext import a, b
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "lopt_ext" and len(parts) > 1:
                    found.add(parts[1])
    return found


def _rank(name):
    return RANKS.get(name, OUTER)


@pytest.mark.parametrize("module", sorted(RANKS.keys() - {"_lopt_cpu", "_lopt_cuda"}))
def test_core_module_imports_only_lower_layers(module):
    path = PKG / f"{module}.py"
    assert path.exists(), f"{path} is listed as a layer but missing"
    upward = sorted(m for m in _imports(path) if _rank(m) >= _rank(module))
    assert not upward, f"lopt_ext/{module}.py imports {upward}, which are not below it (lopt_ext/base.py)"


def test_every_core_python_file_has_a_layer():
    """A new top-level module that the core modules import must be given a rank here."""
    core = [m for m in RANKS if _rank(m) >= 0]
    for module in core:
        for imported in _imports(PKG / f"{module}.py"):
            assert imported in RANKS, f"lopt_ext/{module}.py imports lopt_ext.{imported}, which has no layer"


def test_the_checker_sees_function_level_imports(tmp_path):
    """The check must be able to fail: a lazy upward import inside a function is found."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from lopt_ext import optax_api\n    from lopt_ext.update import x\n")
    assert _imports(f) == {"optax_api", "update"}
