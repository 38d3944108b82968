import json
import re
import subprocess
import sys

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


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_help_lists_every_config_flag_with_its_docstring(capsys, command):
    import dataclasses

    from grokinterp.config import SECTIONS, field_docs

    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps help text; compare with whitespace folded
    for cls in SECTIONS.values():
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            assert re.search(rf"{re.escape(flag)}\b", text), flag
            assert " ".join(docs[f.name].split())[:40] in text, f"{flag}: its docstring is not its help"


def _hand_made_run(root, rows):
    """A run folder whose metrics log is written by hand, so the steps a listing should show are known."""
    from grokinterp.checkpoints import RunStore
    from grokinterp.config import RunConfig
    from grokinterp.tasks import build_task

    store = RunStore.create(root / "handmade", RunConfig().replace(p=7, frac_train=0.6), build_task("add", 7, 5, 0.6, 0))
    (store.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return store.path


def test_first_step_reaching_on_a_hand_written_log(tmp_path):
    from grokinterp.checkpoints import first_step_reaching

    rows = [{"step": 0, "train_acc": 0.1, "val_acc": 0.0}, {"step": 10, "train_acc": 0.98, "val_acc": 0.2},
            {"step": 20, "train_acc": 0.99, "val_acc": 0.5}, {"step": 30, "train_acc": 0.95, "val_acc": 0.995},
            {"step": 40, "train_acc": 1.0, "val_acc": 0.98}]
    assert first_step_reaching(rows, "train_acc", 0.99) == 20  # exactly at the threshold counts
    assert first_step_reaching(rows, "val_acc", 0.99) == 30  # the first time, even if it dips afterwards
    assert first_step_reaching(rows, "val_acc", 0.5) == 20
    assert first_step_reaching(rows, "val_acc", 0.999) is None
    assert first_step_reaching(rows, "no_such_column", 0.5) is None
    assert first_step_reaching([], "val_acc", 0.5) is None
    assert load_run(_hand_made_run(tmp_path, rows)).first_step_reaching("val_acc", 0.99) == 30


def test_runs_lists_the_steps_of_a_hand_written_log(tmp_path, capsys):
    rows = [{"step": 0, "train_acc": 0.1, "val_acc": 0.0}, {"step": 10, "train_acc": 0.995, "val_acc": 0.3},
            {"step": 20, "train_acc": 1.0, "val_acc": 0.991}, {"step": 25, "train_acc": 1.0, "val_acc": 0.9876}]
    _hand_made_run(tmp_path, rows)
    assert main(["runs", str(tmp_path)]) == 0
    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["run", "op", "size", "steps", "ckpts", "train", "99%", "val", "99%", "val", "acc"]
    assert row.split() == ["handmade", "add", "p=7", "25", "0", "10", "20", "98.8%"]


def test_skip_corrupt_flag_skips_a_damaged_checkpoint_with_a_warning(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path), "--name", "r", *TINY]) == 0
    run = load_run(tmp_path / "r")
    victim = run.steps[2]
    weights = tmp_path / "r" / "weights" / f"step_{victim:07d}.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = tmp_path / "analyses"
    capsys.readouterr()
    assert main(["analyze", str(run.path), "--metric", "weight-norm", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and weights.name in err[0], err
    # a real process, so the warning is checked where a person reads it: on stderr
    done = subprocess.run([sys.executable, "-m", "grokinterp", "analyze", str(run.path), "--metric", "weight-norm",
                           "--out", str(out), "--no-progress", "--skip-corrupt"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if f"skipping step {victim}" in line]
    assert len(warning) == 1 and weights.name in warning[0], done.stderr
    computed, cached = map(int, re.search(r"(\d+) checkpoint\(s\) computed, (\d+) from cache, 1 skipped",
                                          done.stdout).groups())
    assert computed + cached == len(run.steps) - 1, done.stdout
    import pandas as pd

    table = pd.read_csv(next(out.rglob("weight-norm.csv")))
    assert sorted(table.step) == [s for s in run.steps if s != victim]
