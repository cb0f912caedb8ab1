"""The README's generated regions must equal what the committed JSON gives
(tools/readme_tables.py --check); rerun `python tools/readme_tables.py` after a new benchmark
or evaluation run. Also the rewriting rules themselves, on a small document."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool():
    spec = importlib.util.spec_from_file_location("readme_tables", os.path.join(ROOT, "tools", "readme_tables.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_matches_the_committed_json():
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "readme_tables.py"), "--check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr


def test_committed_targets_agree_with_the_committed_results():
    """targets.json is derived from results.json: both must come from the same run and code."""
    rt = _tool()
    with open(os.path.join(ROOT, "docs", "bench", "results.json")) as f:
        _, _, _, rows = rt.bench_report.parse(json.load(f))
    with open(os.path.join(ROOT, "docs", "bench", "targets.json")) as f:
        assert rt.bench_report.check_targets(rows) == json.load(f)


@pytest.fixture
def toy(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps({"rows": [1, 2], "word": "two"}))
    regions = {"table": ("a.json", lambda d: "| n |\n| ---: |\n" + "\n".join(f"| {r} |" for r in d["rows"])),
               "word": ("a.json", lambda d: d["word"])}
    return str(tmp_path), regions


def test_rewrite_block_and_inline_regions(toy):
    root, regions = toy
    rt = _tool()
    text = ("intro\n<!-- BEGIN GENERATED table -->\nstale\n<!-- END GENERATED table -->\n"
            "there are <!-- BEGIN GENERATED word -->one<!-- END GENERATED word --> rows\n")
    new = rt.rewrite(text, root, regions)
    assert new == ("intro\n<!-- BEGIN GENERATED table -->\n| n |\n| ---: |\n| 1 |\n| 2 |\n"
                   "<!-- END GENERATED table -->\nthere are <!-- BEGIN GENERATED word -->two"
                   "<!-- END GENERATED word --> rows\n")
    assert rt.rewrite(new, root, regions) == new


@pytest.mark.parametrize("text,msg", [
    ("<!-- BEGIN GENERATED table -->\n", "unpaired"),
    ("<!-- BEGIN GENERATED table -->\n<!-- END GENERATED word -->\n", "out of order"),
    ("<!-- BEGIN GENERATED nope -->\n<!-- END GENERATED nope -->\n", "not registered"),
    ("<!-- BEGIN GENERATED table -->\n<!-- END GENERATED table -->\n", "missing from the README"),
    ("<!-- BEGIN GENERATED table --><!-- END GENERATED table -->"
     "<!-- BEGIN GENERATED word --><!-- END GENERATED word -->", "inline but renders several lines"),
])
def test_bad_markers_are_reported(toy, text, msg):
    root, regions = toy
    with pytest.raises(ValueError, match=msg):
        _tool().rewrite(text, root, regions)


def test_readme_training_loop_runs_and_learns():
    """The README's complete jitted training loop, run as printed (fewer steps): it must run
    and at least halve the loss on a batch from its stream."""
    import re
    import jax
    import jax.numpy as jnp
    with open(os.path.join(ROOT, "README.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    loop = [b for b in blocks if "donate_argnums" in b]
    assert len(loop) == 1, "the README's training loop is missing"
    code = loop[0].replace("num_steps = 1000", "num_steps = 60")
    assert code != loop[0]
    ns = {}
    exec(compile(code, "README.md", "exec"), ns)
    x = jax.random.normal(jax.random.fold_in(ns["k3"], 0), (64, 16))
    batch = (x, jnp.sin(x[:, :1]))
    k1, k2, _ = jax.random.split(jax.random.PRNGKey(0), 3)
    init = {"w1": jax.random.normal(k1, (16, 64)) / 4, "w2": jax.random.normal(k2, (64, 1)) / 8}
    assert float(ns["loss_fn"](ns["params"], batch)) < 0.5 * float(ns["loss_fn"](init, batch))
