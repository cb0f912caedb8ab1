"""Smoke tests of the benchmark suite (bench/) and its report tool at tiny sizes.

Not timings: they check that the suite still runs, measures the step it claims to
(donation, the fused custom call), and that the accounting and the report are right.
"""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import lopt_ext

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
if str(BENCH) not in sys.path:
    sys.path.append(str(BENCH))  # appended: never shadows the lopt_ext under test

from lopt_bench import ceilings, harness, metrics  # noqa: E402

needs_kernels = pytest.mark.skipif(not lopt_ext.kernels_available(), reason="compiled kernels missing")


def _report_module():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "tools" / "bench_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_useful_flops_match_the_spec():
    assert metrics.useful_flops_per_param(32) == 3968
    assert metrics.useful_flops_per_param(4) == 272


def test_derived_metrics_hand_computed():
    info = {"num_params": 10 ** 6, "min_bytes_per_param": 44.0, "useful_flops_per_param": 3968.0}
    d = metrics.derived(info, 0.1, {"sgemm_gflops": 79.36, "bandwidth_gbs": 2.2})
    assert d["params_per_s"] == pytest.approx(1e7)
    assert d["ns_per_param"] == pytest.approx(100.0)
    assert d["gflop_per_s"] == pytest.approx(39.68)
    assert d["frac_sgemm"] == pytest.approx(0.5)
    assert d["gb_per_s"] == pytest.approx(0.44)
    assert d["frac_bandwidth"] == pytest.approx(0.2)


def test_workloads_have_the_sizes_they_claim():
    full = {w.label: w for w in harness.workloads("full")}
    for n in (10 ** 4, 10 ** 5, 10 ** 6, 10 ** 7):
        wl = full[f"tensor-1e{len(str(n)) - 1}"]
        assert wl.num_params == n and len(wl.shapes[0][1]) == 2
    models = [w for w in full.values() if w.kind == "model"]
    assert [round(np.log10(m.num_params)) for m in models] == [6, 7]
    assert all(m.num_tensors > 50 for m in models)
    for m in models:
        twin = harness.comparison_tensor(m)
        assert abs(twin.num_params - m.num_params) / m.num_params < 1e-3
        assert min(twin.shapes[0][1]) > 100  # a real matrix, not (1, n)


@needs_kernels
def test_steps_donate_and_account_state_bytes():
    wl = harness.tensor_workload(2048)  # one 32 x 64 matrix
    assert wl.shapes[0][1] == (32, 64)
    n = 2048
    # Hand-computed state sizes (float32, int32 counters):
    #   small_fc_lopt: m (3/param) + rms (1/param) + v_row (32 x 3) + v_col (64 x 3) + 2 counters
    #   adam: mu + nu (1/param each) + count
    lopt_state = 4 * (4 * n + 3 * (32 + 64)) + 8
    expected = {"fused": lopt_state, "reference": lopt_state, "pretrained": lopt_state, "adam": 4 * 2 * n + 4}
    for opt, hidden in (("fused", 4), ("reference", 4), ("pretrained", None), ("adam", None), ("adafactor", None)):
        prep = harness.prepare(wl, opt, hidden)
        hlo = prep.compiled.as_text()
        assert ("lopt_fused_update" in hlo) == (opt in ("fused", "pretrained")), opt
        if opt in expected:
            assert prep.state_bytes == expected[opt], opt
        old_params = prep.carry[0]["w"]
        before = np.asarray(old_params).copy()
        prep.run()
        assert old_params.is_deleted(), f"{opt}: params were not donated"
        after = np.asarray(prep.carry[0]["w"])
        assert np.all(np.isfinite(after)) and not np.array_equal(after, before), opt
        info = harness.case_info(prep)
        assert info["state_bytes_per_param"] == pytest.approx(prep.state_bytes / n)
        assert info["temp_bytes_per_param"] >= 0


def test_ceilings_quick_scrub_openblas_env(monkeypatch):
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    c = ceilings.measure(quick=True)
    assert c["sgemm_gflops"] > 0 and c["bandwidth_gbs"] > 0
    assert c["sgemm_rel_err"] < 1e-4  # the timed product was also a correct one
    assert c["child_env"] == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}
    assert c["parent_env"]["OPENBLAS_CORETYPE"] == "Haswell"
    assert c["blas"] and all("internal_api" in b or "error" in b for b in c["blas"])


@needs_kernels
def test_rss_probe_in_a_fresh_process():
    r = harness.run_rss_probe(harness.tensor_workload(2048), "fused", 4, timeout=120)
    assert "rss_error" not in r, r
    assert r["rss_peak_bytes"] >= r["rss_before_step_bytes"] > 0
    assert r["rss_step_delta_bytes"] >= 0


@needs_kernels
def test_suite_runs_and_report_renders(tmp_path):
    """The real suite (tiny sizes, a few cases) writes JSON that the report tool turns into
    markdown and a PNG. Run from tmp_path so it uses the same lopt_ext as this process."""
    out_json = tmp_path / "smoke.json"
    env = harness.child_env()
    env.update(LOPT_BENCH_SIZES="smoke", LOPT_BENCH_RSS="none", LOPT_BENCH_CEILINGS="0")
    cmd = [sys.executable, "-m", "pytest", str(BENCH), "-q", "-p", "no:cacheprovider",
           "-k", "tensor-2.05k-fused-H4 or model-4.1k-fused-H4 or mlp-1.03k-x4-fused-H4 or mlp-1.03k-x4-adam",
           f"--benchmark-json={out_json}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    names = sorted(b["name"] for b in data["benchmarks"])
    assert names == ["mlp-1.03k-x4-adam", "mlp-1.03k-x4-fused-H4", "model-4.1k-fused-H4", "tensor-2.05k-fused-H4"]
    pop = next(b for b in data["benchmarks"] if b["name"] == "mlp-1.03k-x4-fused-H4")["extra_info"]
    assert pop["members"] == 4 and pop["num_params"] == 1033 and pop["workload_kind"] == "population"
    meta = data["machine_info"]["lopt_bench"]
    assert meta["cpu_isa"] in ("generic", "avx2", "avx512")
    assert meta["versions"]["jax"] == jax.__version__
    fused = next(b for b in data["benchmarks"] if b["name"] == "tensor-2.05k-fused-H4")
    assert fused["extra_info"]["useful_flops_per_param"] == 272
    assert fused["extra_info"]["num_params"] == 2048

    report = _report_module()
    assert report.main([str(out_json), "--out-dir", str(tmp_path), "--targets-json", str(tmp_path / "t.json")]) == 0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "| tensor-2.05k | 2.05k | 1 |" in md and "### Targets" in md
    assert "### Small models and populations" in md and "| mlp-1.03k-x4 | 1.03k | 4 |" in md
    targets = json.loads((tmp_path / "t.json").read_text())
    assert {t["id"] for t in targets} == {"h4_temp_bytes"}  # all that these 2 cases allow
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "benchmarks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _fake_row(workload, kind, n, opt, hidden, median, temp=0.0, tensors=1):
    info = {"workload": workload, "workload_kind": kind, "workload_shape": "", "num_params": n,
            "num_tensors": tensors, "optimizer": opt, "hidden_size": hidden,
            "state_bytes_per_param": 16.0, "temp_bytes_per_param": temp,
            "min_bytes_per_param": metrics.MIN_BYTES_PER_PARAM[opt],
            "useful_flops_per_param": metrics.useful_flops_per_param(hidden) if hidden else None}
    return {"name": f"{workload}-{opt}", "extra_info": info,
            "stats": {"median": median, "min": median, "rounds": 5}}


def test_report_target_checks_on_known_numbers(tmp_path):
    """Numbers chosen by hand so each target is met or missed by a clear margin."""
    sgemm = 100.0
    t_h32 = 3968 * 1e7 / (0.95 * sgemm * 1e9)  # 95% of sgemm at 1e7: met
    rows = [
        _fake_row("tensor-1e6", "tensor", 10 ** 6, "fused", 32, t_h32 / 10),
        _fake_row("tensor-1e6", "tensor", 10 ** 6, "reference", 32, t_h32 / 10 * 8),  # only 8x: missed
        _fake_row("tensor-1e7", "tensor", 10 ** 7, "fused", 32, t_h32, temp=0.5),
        _fake_row("tensor-1e7", "tensor", 10 ** 7, "fused", 4, 0.020, temp=1.5),  # temp missed
        _fake_row("tensor-1e7", "tensor", 10 ** 7, "adam", None, 0.015),  # 1.33x adam: met
        _fake_row("model-10M", "model", 10 ** 7, "fused", 4, 0.030, tensors=200),  # 1.5x tensor: missed
        _fake_row("tensor-10M", "tensor_same_count", 10 ** 7, "fused", 4, 0.020),
    ]
    path = tmp_path / "fake.json"
    path.write_text(json.dumps({"machine_info": {"lopt_bench": {"ceilings": {
        "sgemm_gflops": sgemm, "bandwidth_gbs": 20.0}}}, "benchmarks": rows}))
    report = _report_module()
    _, _, ceil, loaded = report.load(str(path))
    got = {t["id"]: t["ok"] for t in report.check_targets(loaded)}
    assert got == {"h32_sgemm_fraction": True, "h32_vs_reference": False, "h4_vs_adam": True,
                   "h4_model_vs_tensor": False, "h4_temp_bytes": False, "h32_temp_bytes": True}, got


def test_metatrain_throughput_tool_runs_and_counts_member_steps():
    """tools/metatrain_throughput.py (issue 25's member-steps/s) on the cheapest task: it must
    run against the current MetaTrainer and report steps * members / time."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "tools" / "metatrain_throughput.py"), "--num-tasks", "1",
                          "--pairs", "2", "--unroll", "2", "--horizon", "4", "--steps", "2", "--cpu-devices", "1",
                          "--task-names", "logreg_d16_n512_b32_seed0"],
                         capture_output=True, text=True, timeout=300, cwd=root)
    assert out.returncode == 0, out.stderr[-2000:]
    row = json.loads(out.stdout.strip().splitlines()[-1])
    assert row["timed_steps"] >= 1 and row["devices"] == 1 and row["median_outer_step_cpu_ms"] > 0
    np.testing.assert_allclose(row["member_steps_per_s"], 2 * 2 * 2 / (row["mean_outer_step_ms"] / 1e3), rtol=1e-9)


@needs_kernels
def test_metatrain_bench_cases_run_and_report(tmp_path):
    """bench/bench_metatrain.py at smoke sizes (learned_optimization's case skipped unless its
    python is given): its tools' numbers reach the JSON, the ES recipe's task-steps per hour
    count candidates x seeds x steps over the timed calls, and the report renders the table,
    including the comparison row when one is present."""
    out_json = tmp_path / "metatrain.json"
    env = harness.child_env(drop=("LOPT_BENCH_LO_PYTHON",))
    env.update(LOPT_BENCH_SIZES="smoke", LOPT_BENCH_CEILINGS="0", LOPT_BENCH_PES_STEPS="3")
    cmd = [sys.executable, "-m", "pytest", str(BENCH / "bench_metatrain.py"), "-q", "-p", "no:cacheprovider",
           f"--benchmark-json={out_json}"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    by = {b["name"]: b["extra_info"] for b in data["benchmarks"]}
    assert sorted(by) == ["es-recipe", "pes-lopt_ext"]
    pes = by["pes-lopt_ext"]["metatrain"]
    assert pes["config"]["task_names"] == ["mlp_digits_32_relu_b64_s1"] and pes["timed_steps"] >= 1
    es = by["es-recipe"]["metatrain"]
    assert es["candidates"] == 3 and es["steps"] == 200 and len(es["tasks"]) == 1
    np.testing.assert_allclose(es["task_steps_per_hour"],
                               3 * 2 * 200 / es["tasks"][0]["steady_call_s"] * 3600, rtol=1e-9)

    # a comparison row, as a run with LOPT_BENCH_LO_PYTHON would write it (numbers by hand)
    lo = dict(pes, member_steps_per_s=1000.0, median_outer_step_ms=320.0)
    ours = dict(pes, member_steps_per_s=6000.0)
    data["benchmarks"].append({"name": "pes-learned_optimization", "stats": {"median": 1.0}, "extra_info": {
        "metatrain": lo, "lopt_ext_same_run": ours, "lopt_ext_over_learned_optimization": 6.0}})
    out_json.write_text(json.dumps(data))
    report = _report_module()
    assert report.main([str(out_json), "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "benchmarks.md").read_text()
    assert "### Meta-training throughput" in md and "| PES, lopt_ext |" in md and "| ES recipe" in md
    assert "| PES, learned_optimization | 1k member-steps/s | 320 ms/outer step" in md and "(6.00x)" in md
