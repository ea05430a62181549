"""The shared command-line layer: all eight entry points fail alike, explain every flag, and
return the documented exit codes."""

import argparse
import os
import signal
import socket
import subprocess
import sys

import pytest

import app
import convert_torch
import evaluate
import sample
import train
from conftest import ROOT
from pixelflow_jax import cli, digits, init_checkpoint, reflow
from pixelflow_jax.errors import CheckpointError, ConfigError, UserError

TINY_TRAIN = os.path.join(ROOT, "configs", "pixelflow_tiny_train.yaml")

# (name, module, command line, required arguments, a bad value and what its message says)
TOOLS = [
    ("sample.py", sample, ["sample.py"], [], ["--cfg", "-1"],
     "--cfg must be a finite number >= 0"),
    ("app.py", app, ["app.py"], [], ["--port", "0"], "--port must be in 1..65535"),
    ("train.py", train, ["train.py"], ["c.yaml", "--out", "o"], ["--stop-after", "0"],
     "--stop-after must be an integer >= 1"),
    ("convert_torch.py", convert_torch, ["convert_torch.py"], ["a", "b"],
     ["--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    ("python -m pixelflow_jax.init_checkpoint", init_checkpoint,
     ["-m", "pixelflow_jax.init_checkpoint"], ["c.yaml", "o"], ["--seed", "-1"],
     "--seed must be an integer in [0, 2^32)"),
    ("python -m pixelflow_jax.digits", digits, ["-m", "pixelflow_jax.digits"],
     ["prepare", "o"], ["--resolution", "-8"], "--resolution must be an integer >= 1"),
    ("evaluate.py", evaluate, ["evaluate.py"], ["s.npz", "r.npz", "--inception", "w.pth"],
     ["--batch", "0"], "--batch must be an integer >= 1"),
    ("python -m pixelflow_jax.reflow", reflow, ["-m", "pixelflow_jax.reflow"],
     ["pairs", "--out", "o", "--num", "5"], ["--num", "0"], "--num must be an integer >= 1"),
]
IDS = [t[0] for t in TOOLS]


def one_error_line(capsys, prog):
    err = capsys.readouterr().err
    # (a subcommand's errors name it: "python -m pixelflow_jax.digits prepare: error: ...")
    assert err.count("\n") == 1 and err.startswith(prog) and ": error: " in err, err
    return err


@pytest.mark.parametrize("prog, module, command, base, bad, message", TOOLS, ids=IDS)
def test_bad_flag_and_bad_value_are_one_line_and_exit_2(capsys, prog, module, command, base,
                                                         bad, message):
    assert module.main([*base, "--no-such-flag"]) == cli.EXIT_USER
    assert "unrecognized arguments: --no-such-flag" in one_error_line(capsys, prog)
    assert module.main([*base, *bad]) == cli.EXIT_USER
    assert message in one_error_line(capsys, prog)


def test_real_processes_exit_2_with_one_line():
    """The ``__main__`` wiring of every entry point, in parallel processes."""
    procs = [(message, subprocess.Popen([sys.executable, *command, *base, *bad], cwd=ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                        text=True))
             for _, _, command, base, bad, message in TOOLS]
    for message, proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 2 and err.count("\n") == 1 and message in err, err
        assert out == ""


def _parsers(parser):
    """``parser`` and its subcommand parsers, with the argv that shows each one's help."""
    yield parser, []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield sub, [name]


@pytest.mark.parametrize("module", [t[1] for t in TOOLS], ids=IDS)
def test_help_exits_0_and_explains_every_flag(capsys, module):
    squeeze = lambda text: "".join(text.split())  # help text is re-wrapped
    checked = 0
    for parser, argv in _parsers(module.build_parser()):
        assert module.main([*argv, "--help"]) == 0
        shown = squeeze(capsys.readouterr().out)
        formatter = parser._get_formatter()
        for action in parser._actions:
            for option in action.option_strings:
                assert option in shown
            if action.help and action.help != argparse.SUPPRESS:
                assert squeeze(formatter._expand_help(action)) in shown, action.dest
                checked += 1
    assert checked >= 3


def test_user_error_is_a_value_error():
    for cls in (UserError, ConfigError, CheckpointError):
        assert issubclass(cls, ValueError)
    with pytest.raises(ValueError, match="bad"):
        raise UserError("bad")


def test_exit_codes_follow_the_signal_convention():
    assert cli.EXIT_INTERRUPTED == 128 + signal.SIGINT
    assert cli.EXIT_PREEMPTED == 128 + signal.SIGTERM
    assert (cli.EXIT_USER, cli.EXIT_NAN, cli.EXIT_UNFINISHED) == (2, 3, 3)
    assert train.EXIT_NAN == cli.EXIT_NAN


def test_user_error_messages_stay_on_one_line(capsys):
    def run(args):
        raise UserError("first line\n  second line\n")
    assert cli.run_main(cli.Parser(prog="tool"), run, []) == 2
    assert capsys.readouterr().err == "tool: error: first line second line\n"


# ------------------------------------------------------------------ Ctrl-C

def _interrupt(args):
    raise KeyboardInterrupt


@pytest.mark.parametrize("module, name, argv, says, never", [
    (sample, "run", ["--out", "g.png"], "g.png was not written; the finished images are kept in",
     None),
    (sample, "run", ["--out", "d"],
     "the finished images in d are kept; rerun the same command to resume", None),
    (sample, "run", ["--fid-samples", "4", "--out", "f"], "the finished images in f are kept",
     None),
    (train, "run", ["c.yaml", "--out", "r"], "resume from the last saved checkpoint", None),
    (train, "run", ["c.yaml", "--out", "r", "--export-ema", "e"], "e was not written",
     "resume"),
    (convert_torch, "run", ["a", "b"], "DST was not written", None),
    (init_checkpoint, "run", ["c.yaml", "o"], "OUT was not written", None),
    (digits, "_run", ["prepare", "o"], "OUT was not written", None),
    (app, "run", [], "the server stopped", None),
], ids=["sample-grid", "sample-folder", "sample-fid", "train", "train-export", "convert",
        "init_checkpoint", "digits", "app"])
def test_ctrl_c_is_one_line_and_exit_130(monkeypatch, capsys, module, name, argv, says,
                                         never):
    monkeypatch.setattr(module, name, _interrupt)
    assert module.main(argv) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "interrupted; " in err and says in err, err
    assert never is None or never not in err


# ------------------------------------------------------------------ train.py's exit codes

@pytest.mark.parametrize("status, code", [("nan", 3), ("preempted", 143), ("done", 0),
                                          ("stopped", 0)])
def test_train_exit_code_follows_the_trainer_status(monkeypatch, tmp_path, status, code):
    from pixelflow_jax import trainer

    class FakeTrainer:
        def __init__(self, cfg, out):
            assert cfg.params.depth == 2  # the config file was read
            self.out = out

        def run(self, stop_after=None):
            return trainer.TrainResult(5, status, None)

    monkeypatch.setattr(trainer, "Trainer", FakeTrainer)
    assert train.main([TINY_TRAIN, "--out", str(tmp_path / "r")]) == code


# SIGTERM of a real training run (exit 143, checkpoint saved, resume): tests/test_train.py.


# ------------------------------------------------------------------ app.py and the demo

def test_app_blames_the_host_or_the_port_before_loading(capsys, tmp_path):
    missing = str(tmp_path / "no-checkpoint")  # the address is checked before this
    for host in ("999.1.1.1", "1.2.3.4.5", ""):
        assert app.main(["--host", host, "--ckpt", missing]) == 2
        err = one_error_line(capsys, "app.py")
        assert f"--host {host}" in err and "--port" not in err, err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert app.main(["--port", str(port), "--ckpt", missing]) == 2
        err = one_error_line(capsys, "app.py")
        assert f"--port {port}: Address already in use" in err and "--host" not in err, err
    assert app.main(["--ckpt", missing, "--port", str(port)]) == 2  # the port is free again
    assert "no-checkpoint does not exist" in one_error_line(capsys, "app.py")


def test_demo_messages_do_not_echo_huge_values(ckpt_dir):
    from pixelflow_jax.demo import QUOTE_LIMIT, PixelFlowDemo

    demo = PixelFlowDemo(ckpt_dir)  # loads; compiles nothing
    huge = "x" * 1_000_000
    for call in (lambda: demo.parse(huge), lambda: demo.parse(0, guidance=huge),
                 lambda: demo.parse(0, seed=huge), lambda: demo.parse(0, dopri5=huge),
                 lambda: demo.parse(0, steps=[huge] * demo.num_stages)):
        with pytest.raises(UserError) as e:
            call()
        msg = str(e.value)
        assert len(msg) < QUOTE_LIMIT + 120 and "'xxxxx" in msg and "x…" in msg, msg
    with pytest.raises(UserError) as e:  # short values are quoted whole
        demo.parse("zebra")
    assert str(e.value).startswith("unknown class 'zebra': ")
