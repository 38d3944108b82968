import json

import pytest

from grokinterp.checkpoints import load_run
from grokinterp.cli import main

TINY = ["--op", "add", "--p", "7", "--frac-train", "0.6", "--d-model", "32", "--n-heads", "2", "--d-head", "16",
        "--d-mlp", "64", "--steps", "60", "--lr", "0.01", "--eval-every", "5", "--checkpoints", "6",
        "--log-checkpoints", "4", "--stop-val-acc", "0", "--no-progress"]


def test_train_then_list_end_to_end(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--name", "tiny", *TINY]) == 0
    out = capsys.readouterr().out
    assert f"Run: {tmp_path / 'tiny'}" in out and "grokinterp runs" in out
    run = load_run(tmp_path / "tiny")
    assert run.config.task.p == 7 and run.config.model.d_model == 32 and run.config.train.lr == 0.01
    assert run.steps[-1] == 60 and run.metrics.train_acc.iloc[-1] == 1.0
    saved = json.loads((tmp_path / "tiny" / "config.json").read_text())
    assert saved["train"]["steps"] == 60

    assert main(["runs", str(tmp_path)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:4] == ["run", "op", "size", "steps"]
    row = listing[1].split()
    assert row[:4] == ["tiny", "add", "p=7", "60"]
    assert row[5] == str(run.first_step_reaching("train_acc", 0.99))


def test_resume_from_the_cli(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--name", "r", *TINY, "--steps", "30"]) == 0  # last flag wins
    assert main(["train", "--resume", str(tmp_path / "r"), "--steps", "60", "--no-progress"]) == 0
    assert load_run(tmp_path / "r").steps[-1] == 60
    assert main(["train", "--resume", str(tmp_path / "r"), "--lr", "0.5", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("grokinterp: error: cannot resume") and "--lr 0.5" in err[-1]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--op", "frobnicate"], "unknown operation 'frobnicate'; choose one of: add, sub, mul, div"),
        (["--preset", "huge"], "unknown preset 'huge'; choose one of: nanda2023, power2022, quick"),
        (["--op", "div", "--p", "21"], "p=21 is not prime"),
        (["--frac-train", "0.001", "--p", "7"], "leaves the training split empty"),
        (["--frac-train", "1.0"], "strictly between 0 and 1"),
        (["--lr", "fast"], "--lr expects float, got 'fast'"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--optimizer", "lion"], "choose one of: adamw, adam, sgd"),
        (["--device", "tpu"], "unknown --device 'tpu'"),
        (["--name", "../escape"], "must be a plain folder name"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, flags, message):
    out = tmp_path / "runs"
    assert main(["train", "--out", str(out), "--name", "x", *TINY, *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("grokinterp: error: ") and message in err[0], err
    assert not out.exists() or not any(out.iterdir())


def test_existing_run_is_never_overwritten(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--name", "a", *TINY]) == 0
    before = (tmp_path / "a" / "metrics.jsonl").read_bytes()
    assert main(["train", "--out", str(tmp_path), "--name", "a", *TINY]) == 2
    assert "already exists; pick another --name, or continue it with --resume" in capsys.readouterr().err
    assert (tmp_path / "a" / "metrics.jsonl").read_bytes() == before


def test_resume_of_a_missing_run(tmp_path, capsys):
    assert main(["train", "--resume", str(tmp_path / "ghost")]) == 2
    assert "no run to resume" in capsys.readouterr().err


def test_runs_on_an_empty_folder(tmp_path, capsys):
    assert main(["runs", str(tmp_path)]) == 0
    assert "no runs under" in capsys.readouterr().out


def test_help_lists_every_config_flag(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for flag in ["--op", "--p", "--frac-train", "--data-seed", "--model-seed", "--weight-decay", "--batch-size",
                 "--stop-val-acc", "--freeze-biases", "--log-checkpoints"]:
        assert flag in text
