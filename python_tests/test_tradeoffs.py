"""`python -m lopt_ext tradeoffs`: the memory / compute / performance study (lopt_ext.tradeoffs).

The --quick run through the real command line (~50 s on 2 cores) checks the output files and that
every optimizer has all three axes; the measurements themselves are checked against numbers
computed by hand here (state bytes, FLOPs), and a learned optimizer without a fused kernel must
still get its unfused point with the fused one null and explained.
"""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest

from lopt_ext import __main__ as cli
from lopt_ext import tradeoffs as tr
from lopt_ext import variants
from lopt_ext.config import SmallFcLOpt
from lopt_ext.mlp_lopt import MLPLOpt

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_KEYS = ("state_bytes_per_param_mlp", "state_bytes_per_param_transformer", "temp_bytes_per_param_fused",
               "temp_bytes_per_param_unfused")
COMPUTE_KEYS = ("step_time_ratio_1e6_fused", "step_time_ratio_1e6_unfused", "step_time_ratio_1e7_fused",
                "step_time_ratio_1e7_unfused", "flops_per_param")
PERFORMANCE_KEYS = ("median_steps_ratio", "median_final_ratio", "tasks_worse_than_1.5x", "diverged",
                    "meta_training_cpu_hours")


def _env():
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ----------------------------------------------------------------------------- the whole command
@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tradeoffs") / "out"
    proc = subprocess.run([sys.executable, "-m", "lopt_ext", "tradeoffs", "--quick", "--out", str(out)],
                          cwd=str(out.parent), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "tradeoffs.json") as f:
        return out, json.load(f), proc


def test_quick_writes_every_output(quick_run):
    out, doc, proc = quick_run
    for name in ("tradeoffs.json", "tradeoffs.md", "pareto_time.png", "pareto_memory.png"):
        assert (out / name).is_file(), name
    for name in ("pareto_time.png", "pareto_memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "tradeoffs.md").read_text()
    assert md == tr.render_markdown(doc)  # the table is generated from the JSON
    for name in doc["optimizers"]:
        assert f"| {name} |" in md
    assert doc["mode"] == "quick" and doc["protocol"] and "wrote" in proc.stdout


def test_quick_has_every_optimizer_with_three_axes(quick_run):
    _, doc, _ = quick_run
    expected = list(tr.HAND_DESIGNED) + list(variants.STUDY)
    assert list(doc["optimizers"]) == expected
    for name, rec in doc["optimizers"].items():
        fused_reason = rec["null_reasons"].get("fused")
        for axis, keys in (("memory", MEMORY_KEYS), ("compute", COMPUTE_KEYS), ("performance", PERFORMANCE_KEYS)):
            for key in keys:
                assert key in rec[axis], (name, axis, key)
                value = rec[axis][key]
                if value is not None:
                    assert _is_number(value) and value >= 0, (name, key, value)
                elif key.endswith("_fused"):  # an unavailable fused point: only with a reason
                    assert fused_reason, (name, key)
                elif key == "median_steps_ratio":  # None: never reached and stayed (evaluate.summarize)
                    pass
                elif key == "meta_training_cpu_hours":
                    assert rec["null_reasons"].get(key), name
                else:
                    pytest.fail(f"{name}: {axis}.{key} is null")
        assert rec["memory"]["state_bytes_per_param_mlp"] is not None
        assert rec["compute"]["step_time_ratio_1e6_unfused"] is not None
        assert rec["performance"]["median_final_ratio"] is not None
        if name in variants.STUDY:
            assert rec["theta"] == "untrained (quick)"
            if rec["fused_available"]:
                assert rec["compute"]["step_time_ratio_1e6_fused"] is not None
            else:
                assert rec["compute"]["step_time_ratio_1e6_fused"] is None and fused_reason
    hand = doc["optimizers"]
    assert hand["sgd"]["memory"]["state_bytes_per_param_mlp"] == 0
    assert abs(hand["adam"]["memory"]["state_bytes_per_param_mlp"] - 8.0) < 1e-3
    assert hand["adam"]["performance"]["median_final_ratio"] == pytest.approx(1.0)
    assert len(doc["settings"]["tasks"]) == 2 and doc["settings"]["seeds"] == [0]
    assert doc["settings"]["horizon"] == 200
    for key in ("loadavg_start", "loadavg_end", "cpu_count"):
        assert doc["machine"][key] is not None
    assert doc["ceilings"]["sgemm_gflops"] > 0 and doc["ceilings"]["stream_gbs"] > 0


# ----------------------------------------------------------------------------- memory
SHAPES = {"w": (30, 50), "b": (50,)}
N = 30 * 50 + 50


def test_state_bytes_of_hand_designed_optimizers():
    assert tr.state_bytes(tr.hand_tx("sgd"), SHAPES) == 0
    assert tr.state_bytes(tr.hand_tx("sgd_momentum"), SHAPES) == 4 * N             # one trace
    assert tr.state_bytes(tr.hand_tx("adam"), SHAPES) == 8 * N + 4                 # mu, nu, int32 count
    big = {"w": (200, 300)}  # adafactor factors dims >= 128: rows + cols, the unused v as (1,), count
    assert tr.state_bytes(tr.hand_tx("adafactor"), big) == 4 * (200 + 300) + 4 + 4


def _learned_bytes(lopt, shapes):
    return tr.state_bytes(lopt.transform(lopt.init_theta(__import__("jax").random.PRNGKey(0)), impl="reference"),
                          shapes)


@pytest.mark.parametrize("n", [1, 7, 1000])
def test_state_bytes_of_learned_optimizers_on_a_vector(n):
    vec = {"v": (n,)}
    # iteration and skipped: two int32 scalars
    assert _learned_bytes(SmallFcLOpt(hidden_size=4), vec) == (3 + 1 + 3) * 4 * n + 8  # m[3], rms[1], v_full[3]
    assert _learned_bytes(MLPLOpt(hidden_size=32), vec) == 6 * 4 * n + 8               # 6 momenta
    assert _learned_bytes(variants.STUDY["small_fc_lopt_h4_1m1r"].lopt(), vec) == (1 + 1 + 1) * 4 * n + 8
    assert _learned_bytes(variants.STUDY["small_fc_lopt_h4_no_adafactor"].lopt(), vec) == (3 + 1) * 4 * n + 8


@pytest.mark.parametrize("shape", [(30, 50), (50, 30), (4, 5, 6)])
def test_state_bytes_of_small_fc_lopt_on_a_matrix(shape):
    r, c = sorted(shape)[-2:]  # the two largest axes are factored
    rest = math.prod(shape) // (r * c)
    n = math.prod(shape)
    factored = 3 * rest * (r + c)  # v_row (shape without the largest axis) + v_col, 3 decays each
    assert _learned_bytes(SmallFcLOpt(hidden_size=4), {"w": shape}) == 4 * (4 * n + factored) + 8
    per_param = tr.state_bytes_per_param(
        SmallFcLOpt(hidden_size=4).transform(SmallFcLOpt().init_theta(__import__("jax").random.PRNGKey(1))),
        {"w": shape})
    assert 16.0 < per_param == pytest.approx((4 * (4 * n + factored) + 8) / n)


def test_pytrees_have_the_documented_sizes():
    assert tr.num_params(tr.mlp_shapes()) == 1024 * 768 + 768 + 768 * 256 + 256 + 256 * 64 + 64
    d, v, L = 128, 4096, 6
    per_layer = 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * d
    assert tr.num_params(tr.transformer_shapes(**tr.TRANSFORMER)) == v * d + L * per_layer + 2 * d
    assert 1_000_000 <= tr.num_params(tr.transformer_shapes(**tr.TRANSFORMER)) <= 2_000_000


# ----------------------------------------------------------------------------- FLOPs
def test_flop_formula_by_hand():
    # MLP: 2 (F H + (L-1) H^2 + 2 H), F = 28 normalised features
    assert tr.mlp_flops(28, 4, 2) == 2 * (28 * 4 + 1 * 16 + 8) == 272
    assert tr.mlp_flops(28, 32, 2) == 3968
    # small_fc_lopt H=4: accumulators 3*3 + 1 + 3 + 3, features 3 + 2 + 9, normalisation 3*28,
    # MLP 272, bias + ReLU 2*2*4 + 2, output 5
    assert tr.flops_per_param(SmallFcLOpt(hidden_size=4)) == 16 + 14 + 84 + 272 + 18 + 5 == 409
    # MLPLOpt H=32: 6 momenta (18), normalisation 3*8, MLP 2 (8*32 + 32*32 + 64), bias + ReLU 130, output 5
    assert tr.flops_per_param(MLPLOpt(hidden_size=32)) == 18 + 24 + 2688 + 130 + 5
    assert [tr.flops_per_param(n) for n in tr.HAND_DESIGNED] == [2, 4, 14, 14]


# ----------------------------------------------------------------------------- a missing fused kernel
@dataclasses.dataclass(frozen=True)
class _NoFusedLOpt(SmallFcLOpt):
    """small_fc_lopt whose fused kernel is 'not written yet'."""

    def fused_leaves(self, theta, iteration, leaves, *, write_delta):
        raise NotImplementedError("kernel being written")


def test_unavailable_fused_kernel_gives_null_fused_points_with_the_reason():
    import jax
    lopt = _NoFusedLOpt(hidden_size=4)
    theta = lopt.init_theta(jax.random.PRNGKey(0))
    assert tr.fused_probe(SmallFcLOpt(hidden_size=4), theta) is None
    rec = tr.memory_and_compute("nofused", lopt, theta, sizes={"1e6": 64, "1e7": 256}, repeats=1,
                                mlp=tr.mlp_shapes((16, 8, 4)), transformer=tr.transformer_shapes(64, 8, 1, 2))
    tr.add_ratios(rec, {"1e6": 1e-3, "1e7": 1e-3})
    assert rec["fused_available"] is False
    assert "NotImplementedError: kernel being written" in rec["null_reasons"]["fused"]
    assert rec["memory"]["temp_bytes_per_param_fused"] is None
    assert rec["compute"]["step_time_ratio_1e6_fused"] is None and rec["compute"]["step_time_ratio_1e7_fused"] is None
    assert rec["memory"]["temp_bytes_per_param_unfused"] > 0
    assert rec["compute"]["step_time_ratio_1e6_unfused"] > 0 and rec["compute"]["step_time_ratio_1e7_unfused"] > 0
    assert rec["memory"]["state_bytes_per_param_mlp"] > 16


def test_meta_training_budget_is_read_from_the_theta_file(tmp_path):
    import jax
    from lopt_ext import checkpoint
    name = "small_fc_lopt_h4"
    lopt = variants.STUDY[name].lopt()
    checkpoint.save_theta(str(tmp_path / f"{name}.safetensors"), lopt.init_theta(jax.random.PRNGKey(3)), lopt,
                          info={"budget": {"cpu_hours": 2.5, "wall_s": 4500.0}})
    got_lopt, _, label, hours = tr.load_learned(name, False, str(tmp_path))
    assert got_lopt == lopt and hours == 2.5 and label.endswith(f"{name}.safetensors")
    assert tr.meta_training_cpu_hours({}) is None and tr.meta_training_cpu_hours({"budget": 1.25}) == 1.25


# ----------------------------------------------------------------------------- command line
def _assert_one_error_line(stderr, where):
    lines = stderr.rstrip("\n").splitlines()
    assert lines and lines[0].startswith("usage: python -m lopt_ext"), stderr
    assert "Traceback" not in stderr
    assert len([ln for ln in lines if "error:" in ln]) == 1, stderr
    assert lines[-1].startswith("python -m lopt_ext tradeoffs: error: ") and where in lines[-1], stderr


BAD = [
    (["--repeats", "0"], "argument --repeats: must be a positive integer"),
    (["--repeats", "many"], "argument --repeats: expected a positive integer, got 'many'"),
    (["--seeds", "-1"], "argument --seeds: must be an integer >= 0"),
    (["--horizon", "150"], "argument --horizon: must be a multiple of 100, got 150"),
    (["--horizon", "0"], "argument --horizon: must be a positive integer"),
    (["--only", "nope"], "argument --only: unknown optimizer 'nope'"),
    (["--theta-dir", "no_such_dir"], "argument --theta-dir: no such directory"),
    (["--out", "a_file"], "argument --out: cannot write into 'a_file'"),
]


@pytest.mark.parametrize("argv,where", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_line(argv, where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(SystemExit) as e:
        cli.main(["tradeoffs", "--quick"] + argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _assert_one_error_line(captured.err, where)
    assert sorted(os.listdir(tmp_path)) == ["a_file"]


def test_full_mode_without_theta_files_fails_naming_the_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "thetas").mkdir()
    with pytest.raises(SystemExit) as e:
        cli.main(["tradeoffs", "--theta-dir", "thetas", "--only", "adam", "mlp_lopt_h32"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    _assert_one_error_line(err, "missing theta file " + os.path.join("thetas", "mlp_lopt_h32.safetensors"))
    assert sorted(os.listdir(tmp_path)) == ["thetas"] and not os.listdir(tmp_path / "thetas")


def test_every_option_has_help_and_its_default():
    import argparse
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    p = sub.choices["tradeoffs"]
    formatter = cli._HelpFormatter(cli.PROG)
    for action in p._actions:
        assert action.help, action.option_strings
        if action.option_strings and action.nargs != 0:
            assert "default" in formatter._get_help_string(action), action.option_strings
    assert "(default: None)" not in p.format_help()


def test_committed_study_has_every_optimizer_on_all_three_axes():
    """docs/tradeoffs/tradeoffs.json (the full run): every optimizer of the study, memory, compute
    and performance all measured; learned ones with fused and unfused points and their budget."""
    with open(os.path.join(ROOT, "docs", "tradeoffs", "tradeoffs.json")) as f:
        doc = json.load(f)
    assert doc["mode"] == "full" and len(doc["settings"]["tasks"]) == 16 and doc["settings"]["seeds"] == [0, 1, 2]
    assert set(doc["optimizers"]) == set(tr.study_names())
    for name, rec in doc["optimizers"].items():
        mem, comp, perf = rec["memory"], rec["compute"], rec["performance"]
        learned = rec["family"] == "learned"
        assert _is_number(mem["state_bytes_per_param_mlp"]) and _is_number(mem["state_bytes_per_param_transformer"])
        assert _is_number(mem["temp_bytes_per_param_unfused"]) and _is_number(comp["flops_per_param"])
        for size in ("1e6", "1e7"):
            assert _is_number(comp[f"step_time_ratio_{size}_unfused"]), (name, size)
            if learned:
                assert _is_number(comp[f"step_time_ratio_{size}_fused"]), (name, size)
        assert _is_number(perf["median_final_ratio"]) and perf["task_seeds"] == 48, name
        if learned:
            assert _is_number(mem["temp_bytes_per_param_fused"])
            # published weights of another project (Celo) have no CPU-hours of ours: the reason says so
            assert (_is_number(perf["meta_training_cpu_hours"])
                    or "published" in rec["null_reasons"]["meta_training_cpu_hours"]), name


# ----------------------------------------------------------------------------- outside the checkout
def test_study_thetas_ship_with_the_package():
    """A full run needs no checkout: every trained study theta lies in the installed package."""
    pkg = os.path.dirname(os.path.abspath(tr.__file__))
    assert os.path.commonpath([tr.THETA_DIR, pkg]) == pkg
    learned = [n for n in variants.STUDY if variants.STUDY[n].kind != variants.CELO]
    assert learned and not tr.missing_thetas(learned)
    for name in learned:
        lopt, _, label, _ = tr.load_learned(name, False)
        assert type(lopt) is type(variants.STUDY[name].lopt()) and label.endswith(f"{name}.safetensors")


def test_default_outputs_never_touch_the_committed_study(tmp_path):
    """Run from another directory without --out: the outputs go under that directory's runs/,
    and the committed docs/tradeoffs stays as it was (a full run's default is runs/ too)."""
    assert not tr.DEFAULT_OUT.startswith("docs") and not tr.QUICK_OUT.startswith("docs")
    committed = os.path.join(ROOT, "docs", "tradeoffs", "tradeoffs.json")
    before = os.stat(committed).st_mtime_ns
    proc = subprocess.run([sys.executable, "-m", "lopt_ext", "tradeoffs", "--quick", "--only", "adam",
                           "small_fc_lopt_h4", "--no-progress"],
                          cwd=str(tmp_path), env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / tr.QUICK_OUT / "tradeoffs.json") as f:
        assert list(json.load(f)["optimizers"]) == ["adam", "small_fc_lopt_h4"]
    assert os.stat(committed).st_mtime_ns == before
