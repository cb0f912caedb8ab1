"""tools/scale_es.py: its objective against hand-computed values, and --resume continuing a
search exactly where it stopped."""
import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
import scale_es  # noqa: E402


def test_score_is_the_clipped_log_ratio_of_final_smoothed_losses():
    n = 201  # 1000 steps recorded every 5, plus the initial point
    base = np.full((2, n), 0.2)
    held = np.stack([np.full((2, n), 0.1), np.full((2, n), 0.2), np.full((2, n), 1e3)])  # 0.5x, 1x, 5000x
    held[1, 1, -1] = np.nan  # a NaN in the last 20 steps: non-finite, scored as the clip
    v = scale_es.score_task(held, base)
    assert v.shape == (3, 2)
    np.testing.assert_allclose(v[0], np.log(0.5))
    assert v[1, 0] == pytest.approx(0.0) and v[1, 1] == scale_es.CLIP[1]
    np.testing.assert_allclose(v[2], scale_es.CLIP[1])  # log(5000) clipped
    tiny = np.full((1, 2, n), 1e-6)
    np.testing.assert_allclose(scale_es.score_task(tiny, base), scale_es.CLIP[0])


def test_views_score_is_the_mean_clipped_log_ratio_against_adam_tuned_per_view():
    """Two Adam learning rates, one best on held-out loss and one on training loss; a candidate
    at half the first's best held-out loss and 4x the second's final training loss scores
    (log 0.5 + log 4) / 2 per seed with both views, each alone with one."""
    n, m = 201, 11  # 1000 steps: held-out every 5, training loss every 100, plus the initial point
    slow = (np.full((2, n), 0.4), np.full((2, m), 0.1))   # better held-out
    fast = (np.full((2, n), 0.8), np.full((2, m), 0.01))  # better training loss
    reference = [("lr=a", *slow), ("lr=b", *fast)]
    held = np.full((1, 2, n), 0.2)
    train = np.full((1, 2, m), 0.04)
    both = scale_es.score_task_views(held, train, reference, 1000, ["best_heldout", "train_final"])
    np.testing.assert_allclose(both, [[(np.log(0.5) + np.log(4)) / 2] * 2])
    np.testing.assert_allclose(scale_es.score_task_views(held, train, reference, 1000, ["train_final"]), np.log(4))
    bad = np.full((1, 2, m), np.nan)  # a non-finite training loss: the clip's upper end
    np.testing.assert_allclose(scale_es.score_task_views(held, bad, reference, 1000, ["train_final"]),
                               scale_es.CLIP[1])


def test_coordinates_round_trip():
    from lopt_ext import pretrained
    _, theta = pretrained.load("scaled_small_fc_lopt_h4")
    x = scale_es.coordinates(theta)
    assert x.shape == (theta["tensor_scale"]["w_lin"].shape[0] + 1,)
    back = scale_es.with_coordinates(theta, x + 1.0)
    np.testing.assert_allclose(np.asarray(back["tensor_scale"]["w_lin"]), np.asarray(theta["tensor_scale"]["w_lin"]) + 1)
    np.testing.assert_allclose(np.asarray(back["tensor_scale"]["b"]), np.asarray(theta["tensor_scale"]["b"]) + 1)
    np.testing.assert_array_equal(np.asarray(back["nn"]["~"]["w0"]), np.asarray(theta["nn"]["~"]["w0"]))
    # with the decays: one unit multiplies 1 - beta by e (SmallFcLOpt.decays)
    lopt, _ = pretrained.load("scaled_small_fc_lopt_h4")
    y = scale_es.coordinates(theta, "scale+decays")
    assert y.size == x.size + 4
    y = y.copy()
    y[x.size] += 1.0  # the first momentum decay
    moved = scale_es.with_coordinates(theta, y, "scale+decays")
    before, after = lopt.decays(theta)[0][0], lopt.decays(moved)[0][0]
    assert float(1 - after) == pytest.approx(float(1 - before) * np.e, rel=1e-5)
    # with the hidden units' output weights
    h = theta["tensor_scale"]["w2"].shape[0]
    z = scale_es.coordinates(theta, "scale+hidden")
    assert z.size == x.size + h
    moved = scale_es.with_coordinates(theta, z + 2.0, "scale+hidden")
    np.testing.assert_allclose(np.asarray(moved["tensor_scale"]["w2"]), np.asarray(theta["tensor_scale"]["w2"]) + 2)
    np.testing.assert_array_equal(np.asarray(moved["tensor_scale"]["w1"]), np.asarray(theta["tensor_scale"]["w1"]))


def test_progress_coordinates_move_only_the_progress_weights_and_biases(tmp_path):
    from lopt_ext import pretrained
    from lopt_ext.scaled import with_progress_inputs
    lopt, theta = with_progress_inputs(*pretrained.load("scaled_small_fc_lopt_h4"))
    ts = theta["tensor_scale"]
    x = scale_es.coordinates(theta, "progress")
    np.testing.assert_array_equal(x, [0, 0, float(ts["b"][0]), 0, 0, -30.0])
    moved = scale_es.with_coordinates(theta, np.asarray([1, 2, 3, 4, 5, 6], np.float32), "progress")
    mt = moved["tensor_scale"]
    np.testing.assert_array_equal(np.asarray(mt["w_lin"][:-2]), np.asarray(ts["w_lin"][:-2]))
    np.testing.assert_array_equal(np.asarray(mt["w_lin"][-2:]), [1, 2])
    assert float(mt["b"][0]) == 3 and float(mt["decay_b"][0]) == 6
    np.testing.assert_array_equal(np.asarray(mt["decay_w"]), [4, 5])
    np.testing.assert_array_equal(np.asarray(mt["w1"]), np.asarray(ts["w1"]))
    y = scale_es.coordinates(theta, "scale+progress")  # all of w_lin and b, then the decay's
    assert y.size == ts["w_lin"].shape[0] + 1 + 3
    moved = scale_es.with_coordinates(theta, y + 1.0, "scale+progress")["tensor_scale"]
    np.testing.assert_allclose(np.asarray(moved["w_lin"]), np.asarray(ts["w_lin"]) + 1)
    np.testing.assert_allclose(np.asarray(moved["decay_w"]), [1, 1])
    assert float(moved["decay_b"][0]) == -29.0 and float(moved["b"][0]) == pytest.approx(float(ts["b"][0]) + 1)
    with pytest.raises(SystemExit):  # the progress coordinates need the progress inputs
        scale_es.main(["--out", str(tmp_path), "--coordinates", "progress"])
    with pytest.raises(SystemExit):
        scale_es.main(["--out", str(tmp_path), "--progress-inputs", "--decay-start", "0.5"])


@pytest.mark.slow
def test_resume_continues_the_search_exactly(tmp_path):
    common = ["--task-indices", "0", "--pairs", "1", "--steps", "100", "--seeds", "0"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    scale_es.main(["--out", full, "--generations", "2"] + common)
    scale_es.main(["--out", part, "--generations", "1"] + common)
    scale_es.main(["--out", part, "--generations", "2", "--resume"] + common)
    a, b = (json.load(open(os.path.join(d, "es.json"))) for d in (full, part))
    assert a["generation"] == b["generation"] == 1
    np.testing.assert_allclose(a["mean"], b["mean"], rtol=0, atol=0)
    assert [h["scores"] for h in a["history"]] == [h["scores"] for h in b["history"]]
    from lopt_ext import pretrained
    start = pretrained.info("scaled_small_fc_lopt_h4")["budget"]
    assert len(b["runs"]) == 2  # the budget adds up: the starting entry's, then both runs
    assert b["budget"]["wall_s"] == pytest.approx(start["wall_s"] + sum(r["wall_s"] for r in b["runs"]))
    assert len(b["budget"]["runs"]) == len(start["runs"]) + 2
    with pytest.raises(SystemExit):
        scale_es.main(["--out", part, "--generations", "3", "--resume", "--pairs", "2",
                       "--task-indices", "0", "--steps", "100", "--seeds", "0"])


def test_loss_coordinates_move_the_last_inputs_and_a_search_feeds_the_loss(tmp_path):
    from lopt_ext import checkpoint, pretrained
    from lopt_ext.scaled import with_loss_inputs
    lopt, theta = with_loss_inputs(*pretrained.load("scaled_small_fc_lopt_h4_horizon"), "validation")
    ts = theta["tensor_scale"]
    n = ts["w_lin"].shape[0]
    x = scale_es.coordinates(theta, "horizon+loss")  # the 6 horizon weights, the 3 loss weights, the bias
    np.testing.assert_array_equal(x[:-1], np.asarray(ts["w_lin"])[-9:])
    np.testing.assert_array_equal(x[-4:-1], [0, 0, 0])
    moved = scale_es.with_coordinates(theta, np.arange(4, dtype=np.float32) + 1, "loss")["tensor_scale"]
    np.testing.assert_array_equal(np.asarray(moved["w_lin"][:n - 3]), np.asarray(ts["w_lin"][:n - 3]))
    np.testing.assert_array_equal(np.asarray(moved["w_lin"][-3:]), [1, 2, 3])
    assert float(moved["b"][0]) == 4
    assert "horizon+loss" in scale_es.usable_kind("horizon", False, True, "train")
    assert scale_es.usable_kind("horizon+loss", False, True, None) is not None
    assert scale_es.usable_kind("loss", False, False, "train") is None
    with pytest.raises(SystemExit):  # 'horizon' would move the loss weights of such a rule
        scale_es.main(["--out", str(tmp_path), "--from-pretrained", "scaled_small_fc_lopt_h4_horizon",
                       "--loss-inputs", "train", "--coordinates", "horizon"])
    out = str(tmp_path / "run")
    scale_es.main(["--out", out, "--from-pretrained", "scaled_small_fc_lopt_h4_horizon", "--loss-inputs",
                   "validation", "--coordinates", "loss", "--task-indices", "0", "--pairs", "1", "--steps", "100",
                   "--seeds", "0", "--generations", "1", "--objective-views", "best_heldout", "train_final"])
    info = json.load(open(os.path.join(out, "es.json")))
    assert info["loss_inputs"] == "validation" and len(info["history"][0]["scores"]) == 3
    assert all(np.isfinite(info["history"][0]["scores"]))
    rule, _ = checkpoint.load_theta(os.path.join(out, "theta.safetensors"))
    assert rule.loss_inputs == "validation" and rule.horizon_inputs


def test_augmented_search_runs_on_reparameterized_copies(tmp_path):
    common = ["--task-indices", "0", "--pairs", "1", "--steps", "100", "--seeds", "0", "--generations", "1"]
    out = str(tmp_path / "aug")
    scale_es.main(["--out", out, "--augment-reparam", "1"] + common)
    info = json.load(open(os.path.join(out, "es.json")))
    from lopt_ext.tasks import family
    assert info["tasks"] == [family.task_name(family.TRAIN_SPECS[0]) + "@reparam0"]
    assert info["augment_reparam"] == 1.0 and all(np.isfinite(info["history"][0]["scores"]))
    adam = json.load(open(os.path.join(out, "adam.json")))
    assert all("@reparam0" in k for k in adam)  # Adam is tuned on the copy, not the task
    with pytest.raises(SystemExit):  # a resumed search keeps its augmentation
        scale_es.main(["--out", out, "--resume"] + common[:-2] + ["--generations", "2"])
    with pytest.raises(SystemExit):
        scale_es.main(["--out", str(tmp_path / "bad"), "--augment-reparam", "-1"] + common)


def test_a_search_starts_from_a_theta_file_and_adds_its_runs_budget(tmp_path):
    from lopt_ext import checkpoint, pretrained
    lopt, theta = pretrained.load("scaled_small_fc_lopt_h4")
    run = tmp_path / "metatrain_run"  # what meta-train leaves: OUT/theta.safetensors, OUT/provenance.json
    run.mkdir()
    moved = dict(theta, tensor_scale=dict(theta["tensor_scale"], b=theta["tensor_scale"]["b"] + 0.25))
    checkpoint.save_theta(str(run / "theta.safetensors"), moved, lopt)
    (run / "provenance.json").write_text(json.dumps(
        {"budget": {"wall_s": 100.0, "cpu_hours": 0.5, "runs": [{"command": "meta-train ...", "wall_s": 100.0}]}}))
    out = str(tmp_path / "es")
    common = ["--task-indices", "0", "--pairs", "1", "--steps", "100", "--seeds", "0", "--generations", "1"]
    scale_es.main(["--out", out, "--from-pretrained", str(run / "theta.safetensors")] + common)
    info = json.load(open(os.path.join(out, "es.json")))
    assert info["from_pretrained"] == str(run / "theta.safetensors")
    assert info["budget"]["wall_s"] > 100.0 and info["budget"]["runs"][0]["command"] == "meta-train ..."
    _, start = checkpoint.load_theta(os.path.join(out, "start.safetensors"))  # the file's theta, not the entry's
    np.testing.assert_array_equal(np.asarray(start["tensor_scale"]["b"]), np.asarray(moved["tensor_scale"]["b"]))
    plain, plain_theta = pretrained.load("small_fc_lopt_h4")
    checkpoint.save_theta(str(tmp_path / "plain.safetensors"), plain_theta, plain)
    for bad in (str(tmp_path / "missing.safetensors"), str(tmp_path / "plain.safetensors"), "no_such_entry"):
        with pytest.raises(SystemExit):
            scale_es.main(["--out", str(tmp_path / "bad"), "--from-pretrained", bad] + common)
