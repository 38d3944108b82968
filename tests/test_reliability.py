"""Runs survive SIGKILL, resume bit-for-bit, and can be analysed while they train.

These tests start real ``python -m grokinterp train`` processes. Set GROKINTERP_KILLS to kill more often than the
default (the closing note of issue 6 records a longer session).
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_flags

from grokinterp.analyze import analyze
from grokinterp.checkpoints import RunStore, load_run
from grokinterp.config import RunConfig
from grokinterp.metrics.weights import weight_norms
from grokinterp.trainer import train

KILLS = int(os.environ.get("GROKINTERP_KILLS", "3"))


def start_training(run_dir: Path, config: RunConfig) -> subprocess.Popen:
    if run_dir.exists():
        argv = ["train", "--resume", str(run_dir)]
    else:
        argv = ["train", "--out", str(run_dir.parent), "--name", run_dir.name, *cli_flags(config.to_dict())]
    return subprocess.Popen([sys.executable, "-m", "grokinterp", *argv, "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_log_rows(run_dir: Path, proc: subprocess.Popen, at_least: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= at_least:
            return
        time.sleep(0.02)


def assert_only_complete_files(run_dir: Path) -> None:
    """Whatever moment the kill hit, every file a reader can see is whole."""
    store = RunStore(run_dir)
    run = load_run(run_dir)
    keys = None
    for step in store.steps():
        weights = store.read_weights(step)  # raises on a torn file
        keys = keys or set(weights)
        assert set(weights) == keys, step
    rows = store.read_metrics()
    assert [r["step"] for r in rows] == sorted({r["step"] for r in rows})
    state = store.read_trainer_state()
    if state is not None:
        assert state.step in store.steps()
    assert run.data.tokens.shape[1] == 3


def config_for(tiny) -> RunConfig:
    # a checkpoint every 3 steps: most kills land near a write
    return tiny(steps=300, eval_every=5, checkpoints=100, log_checkpoints=10)


def test_sigkill_at_random_moments_then_resume_is_bit_for_bit(tmp_path, tiny):
    config = config_for(tiny)
    run_dir = tmp_path / "killed"
    rng = random.Random(0)
    kills = 0
    for _ in range(KILLS):
        proc = start_training(run_dir, config)
        rows_before = len(RunStore(run_dir).read_metrics()) if run_dir.exists() else 0
        wait_for_log_rows(run_dir, proc, rows_before + 1)
        time.sleep(rng.uniform(0.0, 0.5))
        if proc.poll() is not None:  # finished before the kill: nothing left to interrupt
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        if run_dir.exists():
            assert_only_complete_files(run_dir)
        state = RunStore(run_dir).read_trainer_state() if run_dir.exists() else None
        print(f"kill {kills}: last complete checkpoint at step {state.step if state else None}")
    assert kills >= 1
    proc = start_training(run_dir, config)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err

    killed = load_run(run_dir)
    whole = train(config, tmp_path / "whole", device="cpu", progress=False).run  # this process, never killed
    assert killed.steps == whole.steps and killed.steps[-1] == 300
    for step in whole.steps:
        a, b = killed.state_dict(step), whole.state_dict(step)
        assert all(torch.equal(a[k], b[k]) for k in b), f"weights differ at step {step}"
    assert killed.metrics.drop(columns="time_s").equals(whole.metrics.drop(columns="time_s"))
    assert killed.trainer_state.finished


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, tiny):
    config = tiny()
    run_dir = tmp_path / "early"
    RunStore.create(run_dir, config, _task(config))  # what a kill right after creating the directory leaves
    result = train(config, run_dir, resume=True, device="cpu", progress=False)
    whole = train(config, tmp_path / "whole", device="cpu", progress=False)
    assert result.step == 60 and result.run.steps == whole.run.steps
    for step in whole.run.steps:
        a, b = result.run.state_dict(step), whole.run.state_dict(step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), f"weights differ at step {step}"
    assert result.run.metrics.drop(columns="time_s").equals(whole.run.metrics.drop(columns="time_s"))


def _task(config):
    from grokinterp.tasks import build_task

    t = config.task
    return build_task(t.op, t.p, t.n, t.frac_train, t.data_seed)


def test_analysing_a_run_while_it_trains_reads_only_finished_checkpoints(tmp_path, tiny):
    config = config_for(tiny)
    run_dir = tmp_path / "live"
    proc = start_training(run_dir, config)
    seen = []
    try:
        wait_for_log_rows(run_dir, proc, 2)
        # a writer's temporary file, as a kill mid-write leaves it, is never taken for a checkpoint
        (run_dir / "weights" / ".step_0999999.safetensors.tmp99999").write_bytes(b"\x00" * 10)
        for _ in range(3):
            result = analyze(load_run(run_dir), "weight-norm", out_root=tmp_path / "analyses", progress=False)
            seen.append(result.table)
            time.sleep(0.3)
    finally:
        _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    run = load_run(run_dir)
    assert 999_999 not in run.steps
    names = {name for name, _ in run.model().named_parameters()}
    for table in seen:
        assert set(table.step) <= set(run.steps)
        for step, total in zip(table.step, table.norm_sq_total):
            expected = weight_norms({k: v for k, v in run.state_dict(int(step)).items() if k in names})
            assert total == pytest.approx(expected["norm_sq_total"], rel=1e-12)
    assert len(seen[-1]) >= len(seen[0]) >= 1


# -- the README's other promises, each against a real process ------------------------------------------------------

def _wait_for_rows(run_dir: Path, proc: subprocess.Popen, at_least: int) -> None:
    wait_for_log_rows(run_dir, proc, at_least)
    assert proc.poll() is None, f"training ended before the test could act: {proc.communicate()}"


@pytest.mark.parametrize("trainer", ["train", "sweep"])
def test_a_second_process_cannot_train_a_run_being_trained(tmp_path, tiny, capsys, trainer):
    """The lock is held by the process that trains, whether `grokinterp train` or a member of `grokinterp sweep`."""
    from grokinterp.cli import main

    config = tiny(steps=100_000, checkpoints=1000, log_checkpoints=0)  # far longer than the test: killed below
    if trainer == "train":
        run_dir = tmp_path / "busy"
        proc = start_training(run_dir, config)
    else:
        flags = cli_flags(config.to_dict())
        for grid_flag in ("--frac-train", "--weight-decay", "--model-seed", "--data-seed"):  # set by the grid
            i = flags.index(grid_flag)
            del flags[i:i + 2]
        run_dir = tmp_path / "sw" / "frac0.60_wd1_seed0"
        proc = subprocess.Popen([sys.executable, "-m", "grokinterp", "sweep", "--out", str(tmp_path), "--name", "sw",
                                 "--seeds", "0", "--fracs", "0.6", "--weight-decays", "1", "--group-size", "2",
                                 *flags, "--no-progress", "--device", "cpu"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_rows(run_dir, proc, 2)
        capsys.readouterr()
        # the stop rule makes an unlocked resume end at once (exit 0) instead of training on for the whole budget
        assert main(["train", "--resume", str(run_dir), "--stop-val-acc", "0.01", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert "being trained by another process" in err[-1], err
    finally:
        proc.kill()
        proc.wait()
    assert main(["train", "--resume", str(run_dir), "--steps", "100000", "--stop-val-acc", "0.01",
                 "--no-progress"]) == 0  # free once the trainer is gone


def test_ctrl_c_on_the_command_line_saves_prints_the_resume_command_and_resumes_bit_for_bit(tmp_path, tiny):
    config = tiny(steps=600, eval_every=5, checkpoints=20, log_checkpoints=4)
    run_dir = tmp_path / "interrupted"
    proc = start_training(run_dir, config)
    _wait_for_rows(run_dir, proc, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, (out, err)
    assert f"continue with:  grokinterp train --resume {run_dir}" in out, out
    stopped = load_run(run_dir)
    at = stopped.trainer_state.step
    assert at == stopped.steps[-1] < 600 and not stopped.trainer_state.finished

    resumed = start_training(run_dir, config)
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    run = load_run(run_dir)
    whole = train(config, tmp_path / "whole", device="cpu", progress=False).run
    assert set(run.steps) == set(whole.steps) | {at}  # the schedule, plus the checkpoint Ctrl-C saved
    for step in whole.steps:
        a, b = run.state_dict(step), whole.state_dict(step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), f"weights differ at step {step}"
    assert run.metrics.drop(columns="time_s").equals(whole.metrics.drop(columns="time_s"))


class _WritesAMarker:
    """Unpickling this object would run code: it writes a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code ran"))


def test_a_trainer_state_that_would_run_code_is_refused_and_never_run(tmp_path, tiny, capsys):
    from grokinterp.cli import main

    run = train(tiny(steps=10, checkpoints=2, log_checkpoints=0), tmp_path / "run", device="cpu", progress=False).run
    marker = tmp_path / "marker"
    torch.save({"step": 10, "optimizer": _WritesAMarker(marker), "finished": False, "stop_reason": ""},
               run.path / "trainer_state.pt")
    capsys.readouterr()
    assert main(["train", "--resume", str(run.path), "--steps", "20", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("grokinterp: error: ") and "trainer_state.pt" in err[-1], err
    assert not marker.exists(), "loading a trainer state executed code"


def test_every_torch_load_in_the_package_refuses_pickled_code():
    """Each torch.load call passes weights_only=True literally, so no run folder can make the package run code."""
    import ast

    import grokinterp

    calls = []
    for file in Path(grokinterp.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch":
                weights_only = [k.value for k in node.keywords if k.arg == "weights_only"]
                calls.append((file.name, node.lineno))
                assert len(weights_only) == 1 and isinstance(weights_only[0], ast.Constant) \
                    and weights_only[0].value is True, f"{file}:{node.lineno} calls torch.load without weights_only=True"
    assert calls, "the trainer state is read with torch.load somewhere in the package"
    assert not any(isinstance(node, ast.Name) and node.id == "pickle" for file in Path(grokinterp.__file__).parent
                   .rglob("*.py") for node in ast.walk(ast.parse(file.read_text()))), "the package uses pickle"


_SLOW_ANALYSIS = """
import dataclasses, sys, time
from pathlib import Path
from grokinterp.cli import main
from grokinterp.metrics import METRICS

metric = METRICS["weight-norm"]
def slow(ckpt):  # long enough that the two processes overlap
    time.sleep(0.2)
    return metric.fn(ckpt)
METRICS["weight-norm"] = dataclasses.replace(metric, fn=slow)
Path(sys.argv[1]).touch()
while not Path(sys.argv[2]).exists():  # start both analyses at the same moment
    time.sleep(0.01)
sys.exit(main(["analyze", sys.argv[3], "--metric", "weight-norm", "--out", sys.argv[4], "--no-progress"]))
"""


def test_concurrent_analyses_of_one_run_leave_one_row_per_checkpoint(tmp_path, tiny):
    import pandas as pd

    from grokinterp.analyze import analysis_dir

    run = train(tiny(steps=20, checkpoints=4, log_checkpoints=2), tmp_path / "r", device="cpu", progress=False).run
    out, go = tmp_path / "analyses", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _SLOW_ANALYSIS, str(tmp_path / f"ready{i}"), str(go),
                               str(run.path), str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    deadline = time.monotonic() + 120
    while not all((tmp_path / f"ready{i}").exists() for i in range(2)) and time.monotonic() < deadline:
        time.sleep(0.02)
    go.touch()
    outputs = [proc.communicate(timeout=300) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    n = len(run.steps)
    reports = sorted(o.split("weight-norm: ")[1].split(" checkpoint")[0] for o, _ in outputs)
    assert reports == ["0", str(n)]  # the second waited for the first and took its rows
    folder = analysis_dir(run, out)
    assert list(pd.read_csv(folder / "weight-norm.csv").step) == run.steps
    assert len((folder / ".cache" / "weight-norm.jsonl").read_text().splitlines()) == n
