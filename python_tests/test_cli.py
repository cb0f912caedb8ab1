"""The command line a new user meets first: `python -m lopt_ext ...`.

Bad arguments must give argparse's usage line(s) plus one error line and exit 2 before
anything is written; every option of the user-facing commands documents itself and its
default; `--version` answers; `demo` leaves the working directory as it found it.
"""
import os
import re
import subprocess
import sys

import pytest

import lopt_ext
from lopt_ext import __main__ as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCUMENTED = ("demo", "plot", "tasks", "meta-train")


def _env():
    # run the checkout's Python files (the compiled kernels come from the installed copy)
    return dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def _subparsers(parser):
    import argparse
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))


def _assert_one_error_line(stderr: str, where: str):
    lines = stderr.rstrip("\n").splitlines()
    assert lines and lines[0].startswith("usage: python -m lopt_ext"), stderr
    assert "Traceback" not in stderr, stderr
    assert len([ln for ln in lines if "error:" in ln]) == 1, stderr
    assert lines[-1].startswith("python -m lopt_ext") and f"error: {where}" in lines[-1], stderr
    # everything before the error line is argparse's (possibly wrapped) usage
    assert all(ln.startswith(("usage:", " ")) for ln in lines[:-1]), stderr


BAD = [
    (["meta-train", "--out", "out", "--split", "nope"], "argument --split: invalid choice: 'nope'"),
    (["meta-train", "--out", "out", "--estimator", "nope"], "argument --estimator: invalid choice"),
    (["meta-train", "--out", "out", "--impl", "nope"], "argument --impl: invalid choice"),
    (["meta-train", "--out", "out", "--objective", "nope"], "argument --objective: invalid choice"),
    (["meta-train", "--out", "out", "--pairs", "0"], "argument --pairs: must be a positive integer"),
    (["meta-train", "--out", "out", "--outer-steps", "-3"], "argument --outer-steps: must be a positive"),
    (["meta-train", "--out", "out", "--sigma", "nan"], "argument --sigma: expected a positive number"),
    (["meta-train", "--out", "out", "--checkpoint-every", "0"], "argument --checkpoint-every"),
    (["meta-train", "--out", "out", "--task-names", "nope"], "argument --task-names: unknown task 'nope'"),
    (["meta-train", "--out", "out", "--unroll", "30", "--min-horizon", "20"], "need unroll"),
    (["meta-train"], "the following arguments are required: --out"),
    (["meta-train", "--out", "out", "--cpu-devices", "0"], "argument --cpu-devices: must be a positive integer"),
    (["evaluate", "--cpu-devices", "two"], "argument --cpu-devices: expected a positive integer, got 'two'"),
    (["demo", "--task", "nope"], "argument --task: unknown task 'nope'"),
    (["demo", "--steps", "0"], "argument --steps: must be a positive integer"),
    (["demo", "--steps", "ten"], "argument --steps: expected a positive integer, got 'ten'"),
    (["demo", "--seed", "-1"], "argument --seed"),
    (["demo", "--pretrained", "nope"], "argument --pretrained: invalid choice"),
    (["demo", "--png", os.path.join("no_such_dir", "x.png")], "argument --png: cannot write"),
    (["plot", "--window", "0", "log.jsonl"], "argument --window: must be a positive integer"),
    (["plot", "missing.jsonl"], "argument log: no meta-train log at 'missing.jsonl'"),
    (["meta-train", "--out", "out", "--init-theta", "missing.safetensors"],
     "argument --init-theta: no such file: 'missing.safetensors'"),
    (["evaluate", "--horizons", "150"], "argument --horizons: must be a multiple of 100, got 150"),
    (["tasks", "--split", "nope"], "argument --split: invalid choice"),
    (["nope"], "argument COMMAND: invalid choice: 'nope'"),
]


@pytest.mark.parametrize("argv,where", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_exit_2_with_one_error_line_and_write_nothing(argv, where, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    _assert_one_error_line(captured.err, where)
    assert os.listdir(tmp_path) == []


def test_bad_argument_in_a_fresh_interpreter(tmp_path):
    """The real entry point: no KeyError traceback, no --out directory created."""
    proc = subprocess.run([sys.executable, "-m", "lopt_ext", "meta-train", "--out", "out", "--split", "nope"],
                          cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    _assert_one_error_line(proc.stderr, "argument --split: invalid choice: 'nope' (choose from")
    assert os.listdir(tmp_path) == []


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"lopt_ext {lopt_ext.__version__}")


def test_version_in_a_fresh_interpreter(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "lopt_ext", "--version"], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"lopt_ext {lopt_ext.__version__}")


def test_top_level_help_lists_every_command_once():
    parser = cli.build_parser()
    sub = _subparsers(parser)
    text = " ".join(parser.format_help().split())
    for name, p in sub.choices.items():
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", parser.description), name
        assert text.count(p.description) == 1, name
    # the command's own --help repeats the list entry word for word, not in other words
    for action in sub._choices_actions:
        assert sub.choices[action.dest].description == action.help


@pytest.mark.parametrize("command", DOCUMENTED)
def test_every_option_has_help_and_shows_its_default(command):
    p = _subparsers(cli.build_parser()).choices[command]
    for action in p._actions:
        assert action.help, f"{command} {action.option_strings or action.dest} has no help"
    text = p.format_help()
    for bad in ("(default )", "(default: )", "(default: None)", "(default: False)", "(default: [])",
                "(default: ())"):
        assert bad not in text, (command, bad)
    formatter = cli._HelpFormatter(cli.PROG)
    for action in p._actions:
        if not action.option_strings or action.required or action.nargs == 0:  # positionals, --out, flags
            continue
        assert "default" in formatter._get_help_string(action), f"{command} {action.option_strings[0]}"


def test_fixed_value_options_use_choices():
    sub = _subparsers(cli.build_parser())
    for command, dests in (("meta-train", ("impl", "estimator", "split", "objective")),
                           ("demo", ("pretrained",)), ("tasks", ("split",))):
        actions = {a.dest: a for a in sub.choices[command]._actions}
        for d in dests:
            assert actions[d].choices, (command, d)
    assert sub.choices["demo"]._option_string_actions["--task"].type is cli._task_name


def test_demo_writes_no_picture_by_default():
    args = cli.build_parser().parse_args(["demo"])
    assert args.png is None


def test_tasks_split(capsys):
    from lopt_ext import tasks
    cli.main(["tasks", "--split", "test"])
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[1] for ln in lines] == tasks.list_tasks("test")
    assert all(ln.split()[0] == "test" for ln in lines)


@pytest.mark.slow
def test_demo_leaves_the_working_directory_clean(tmp_path):
    """~15 s: the demo's own compile time dominates even at 20 steps."""
    work = tmp_path / "work"
    work.mkdir()
    proc = subprocess.run([sys.executable, "-m", "lopt_ext", "demo", "--steps", "20"], cwd=work, env=_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "learned (fused)" in proc.stdout
    assert os.listdir(work) == []
    png = tmp_path / "pictures" / "demo.png"
    png.parent.mkdir()
    proc = subprocess.run([sys.executable, "-m", "lopt_ext", "demo", "--steps", "20", "--png", str(png)],
                          cwd=work, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.exists()
    assert os.listdir(work) == []
