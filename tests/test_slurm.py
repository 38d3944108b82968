"""``grokinterp sweep --launcher slurm`` against a real scheduler: a single-node SLURM cluster (Debian's munged,
slurmctld and slurmd; ``tests/slurm_cluster.py``) started once for the session with a generated slurm.conf and torn
down afterwards. Jobs go through the real sbatch, run the real submitit entry point and are signalled, requeued and
cancelled by SLURM itself. Where SLURM cannot run (not installed, not root) those tests are skipped with the reason,
unless GROKINTERP_REQUIRE_SLURM is set (``.ci/run`` sets it), which makes that a failure."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from grokinterp import slurm
from grokinterp.analyze import analysis_dir
from grokinterp.checkpoints import load_run
from grokinterp.cli import main
from grokinterp.sweep import grid_configs, member_state, write_manifest

sys.path.insert(0, str(Path(__file__).parent))
from slurm_cluster import SlurmCluster, missing  # noqa: E402

TINY = ["--op", "add", "--p", "7", "--d-model", "32", "--n-heads", "2", "--d-head", "16", "--d-mlp", "64",
        "--lr", "0.01", "--stop-val-acc", "0", "--no-progress", "--device", "cpu"]
SHORT = ["--steps", "40", "--eval-every", "5", "--checkpoints", "4", "--log-checkpoints", "2"]
# long enough (~10-20 s in a job) to be signalled mid-run; few checkpoints, so saving costs little
LONG = ["--steps", "6000", "--eval-every", "50", "--checkpoints", "10", "--log-checkpoints", "2"]


# -- without a cluster --------------------------------------------------------------------------------------------
def _sweep_argv(tmp_path, *extra):
    return ["sweep", "--out", str(tmp_path / "ckpt"), "--analyses-out", str(tmp_path / "an"), "--name", "grid",
            "--seeds", "0,1", *TINY, *SHORT, *extra]


def test_without_submitit_it_says_what_to_install_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit raises ImportError
    assert main(_sweep_argv(tmp_path, "--launcher", "slurm")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "grokinterp: error: --launcher slurm needs submitit: pip install " \
                                      "'grokinterp[slurm]'" in err
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "an").exists()


def test_without_sbatch_it_says_what_to_install_and_writes_nothing(tmp_path, capsys, monkeypatch):
    pytest.importorskip("submitit")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert main(_sweep_argv(tmp_path, "--launcher", "slurm")) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "needs SLURM's sbatch on the PATH" in err and "apt-get install slurm-client" in err
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize("flags, message", [
    (["--partition", "gpu"], "--partition is an option of --launcher slurm"),
    (["--wait"], "--wait is an option of --launcher slurm"),
    (["--launcher", "cluster"], "argument --launcher: invalid choice: 'cluster'"),
    (["--launcher", "slurm", "--cpus-per-job", "0"], "--cpus-per-job must be at least 1, got 0"),
    (["--launcher", "slurm", "--slurm-param", "account"], "--slurm-param expects KEY=VALUE"),
    (["--launcher", "slurm", "--device", "cuda"], "--device cuda needs GPUs on the node: add --gpus-per-job 1"),
])
def test_bad_launcher_input_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, monkeypatch, flags, message):
    if "slurm" in flags:  # get past the checks for submitit and sbatch, to the one under test
        pytest.importorskip("submitit")
        monkeypatch.setattr(slurm.shutil, "which", lambda name, **kw: f"/usr/bin/{name}")
    argv = [a for a in _sweep_argv(tmp_path) if a not in ("--device", "cpu")] + flags
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "ckpt").exists()


def test_jobs_keep_stackable_members_together(tmp_path, tiny):
    grid = [("op", ["add", "sub"]), ("frac_train", [0.7, 0.3]), ("seed", [0, 1])]
    members = grid_configs(tiny(), grid)
    write_manifest(tmp_path, tiny(), grid, members)
    names = [n for n, _, _ in members]
    jobs = slurm.plan_jobs(tmp_path, names, 3)
    assert [len(j) for j in jobs] == [3, 3, 2] and sorted(sum(jobs, [])) == sorted(names)
    assert jobs[0] == ["add_frac0.30_seed0", "add_frac0.30_seed1", "add_frac0.70_seed0"]  # by fraction, as stacked


def test_status_of_a_local_sweep(tmp_path, capsys):
    """Without jobs, the status comes from the run folders alone: finished, stopped (started, unfinished), new."""
    assert main(_sweep_argv(tmp_path)) == 0
    folder = tmp_path / "ckpt" / "grid"
    (folder / "seed1" / "trainer_state.pt").unlink()  # as if it were stopped before its first checkpoint
    capsys.readouterr()
    assert main(["runs", str(folder)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["run", "status", "steps", "val", "99%", "best", "val", "job", "note"]
    assert lines[1].split()[:3] == ["seed0", "finished", "40/40"] and lines[2].split()[:3] == ["seed1", "stopped", "0/40"]
    assert f"{folder}: 1 finished, 1 stopped" in out and f"grokinterp sweep --resume {folder}\n" in out


def test_a_damaged_jobs_file_is_one_line(tmp_path, capsys):
    assert main(_sweep_argv(tmp_path)) == 0
    folder = tmp_path / "ckpt" / "grid"
    (folder / "slurm").mkdir()
    (folder / "slurm" / "jobs.jsonl").write_text('{"job": "7", "members": ["seed0"]}\n{"job": \n')
    capsys.readouterr()
    assert main(["runs", str(folder)]) == 2
    assert "jobs.jsonl line 2 is damaged; remove that line" in capsys.readouterr().err


# -- on a real SLURM cluster --------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = missing()
    if reason is None and importlib.util.find_spec("submitit") is None:
        reason = "submitit not installed (pip install -e '.[dev,slurm]')"
    cluster = None
    if reason is None:
        cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
        try:
            cluster.start()
        except (RuntimeError, OSError, subprocess.SubprocessError) as err:
            cluster.stop()
            reason = f"the test cluster did not start: {err}"
    if reason is not None:
        if os.environ.get("GROKINTERP_REQUIRE_SLURM"):
            pytest.fail(f"GROKINTERP_REQUIRE_SLURM is set, but {reason}")
        pytest.skip(f"no SLURM cluster: {reason}")
    patch = pytest.MonkeyPatch()
    patch.setenv("SLURM_CONF", str(cluster.conf))  # sbatch, squeue, scontrol (in the jobs too: sbatch exports it)
    patch.setattr(slurm, "POLL_S", 0.5)
    yield cluster
    patch.undo()
    cluster.stop()


def _slurm(cluster, *argv) -> str:
    return subprocess.run(argv, env=cluster.env, check=True, capture_output=True, text=True, timeout=30).stdout


def _until(condition, timeout: float, what: str, cluster):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"{what} within {timeout} s; queue:\n{_slurm(cluster, 'squeue', '-t', 'all')}")


def _last_step(run_dir: Path) -> int:
    log = run_dir / "metrics.jsonl"
    lines = log.read_text().splitlines() if log.exists() else []
    return json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0


def _state(folder: Path, name: str) -> slurm.MemberStatus:
    statuses, note = slurm.sweep_status(folder)
    assert note == ""
    return next(s for s in statuses if s.name == name)


@pytest.mark.slurm
def test_a_grid_on_slurm_matches_the_local_launcher(cluster, tmp_path, capsys):
    """Two array tasks of two stacked members each, through sbatch; the results table equals the local one."""
    grid = ["--fracs", "0.5,0.7", "--seeds", "0,1"]
    local = ["sweep", "--out", str(tmp_path / "local"), "--analyses-out", str(tmp_path / "an"), "--name", "grid",
             *grid, *TINY, *SHORT]
    assert main(local) == 0
    on_slurm = [*local, "--launcher", "slurm", "--members-per-job", "2", "--cpus-per-job", "1", "--time-limit", "10",
                "--wait"]
    on_slurm[on_slurm.index(str(tmp_path / "local"))] = str(tmp_path / "slurm")
    capsys.readouterr()
    assert main(on_slurm) == 0
    captured = capsys.readouterr()
    folder = tmp_path / "slurm" / "grid"
    assert "4 of 4 runs in 2 job(s)" in captured.err and "4 of 4 finished" in captured.out
    jobs = slurm.read_jobs(folder)
    assert [len(j["members"]) for j in jobs] == [2, 2] and jobs[0]["job"].endswith("_0")  # one array, two tasks
    assert {p.name for p in (folder / "slurm").glob("*_log.out")} == {f"{j['job']}_0_log.out" for j in jobs}
    ours = pd.read_csv(analysis_dir(folder, tmp_path / "an") / "results.csv")
    theirs = pd.read_csv(analysis_dir(tmp_path / "local" / "grid", tmp_path / "an") / "results.csv")
    exact = [c for c in theirs.columns if c != "final_weight_norm"]
    pd.testing.assert_frame_equal(ours[exact], theirs[exact])  # steps to 99%, accuracies, steps trained: exactly
    # ‖θ‖ to float32 rounding: the local sweep stacked all four members, each job two, and a stack of another
    # size sums in another order
    assert ours.final_weight_norm.to_numpy() == pytest.approx(theirs.final_weight_norm.to_numpy(), rel=1e-6)
    assert main(["runs", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{folder}: 4 finished" in out and out.count("finished") == 5
    assert main(on_slurm) == 0  # again: nothing left to submit, the results are rewritten
    assert "nothing left to submit" in capsys.readouterr().out and len(slurm.read_jobs(folder)) == 2


@pytest.mark.slurm
def test_a_signalled_job_requeues_and_its_member_ends_bit_for_bit(cluster, tmp_path, capsys):
    """SIGUSR2 (what SLURM sends before the time limit) saves the member and requeues the job; scancel (SIGTERM)
    saves it and ends the job; resubmitting finishes it. It ends exactly where an uninterrupted job's member does."""
    argv = ["sweep", "--out", str(tmp_path), "--analyses-out", str(tmp_path / "an"), "--seeds", "0", *TINY, *LONG,
            "--launcher", "slurm"]
    assert main([*argv, "--name", "interrupted"]) == 0
    assert main([*argv, "--name", "reference"]) == 0  # the same member, on the other core, left alone
    folder, member = tmp_path / "interrupted", tmp_path / "interrupted" / "seed0"
    job = slurm.read_jobs(folder)[0]["job"]

    first = _until(lambda: _last_step(member) >= 300 and _last_step(member), 90, "training did not start", cluster)
    assert _state(folder, "seed0").state == "running"
    _slurm(cluster, "scancel", "--signal=USR2", job)
    _until(lambda: "PENDING" in _slurm(cluster, "squeue", "-h", "-o", "%T", "-j", job), 30, "no requeue", cluster)
    requeued_at = _state(folder, "seed0")
    assert requeued_at.state == "queued" and first <= requeued_at.steps < 6000
    assert member_state(folder, "seed0") == "partial"
    out, err = (p.read_text() for p in slurm.job_logs(folder, job))
    assert f"seed0: interrupted at step {requeued_at.steps}" in err and f"Requeued job {job}" in out

    # SLURM holds a requeued job for two minutes (BeginTime); let it start in 2 s. Not at once: slurmd revoked the
    # killed run's credential, and a credential for the same job id issued within the same second counts as revoked
    # ("Killing non-startable batch JobId=...: Job credential revoked"), which failed this test now and then.
    _slurm(cluster, "scontrol", "update", f"JobId={job}", "StartTime=now+2")
    _until(lambda: _last_step(member) >= requeued_at.steps + 300, 90, "the requeued job did not resume", cluster)
    assert _slurm(cluster, "scontrol", "show", "job", job).count("Restarts=1") == 1
    _slurm(cluster, "scancel", job)
    _until(lambda: _state(folder, "seed0").state not in ("queued", "running"), 60, "scancel did not end it", cluster)
    stopped = _state(folder, "seed0")
    assert stopped.state == "stopped" and requeued_at.steps < stopped.steps < 6000, stopped

    capsys.readouterr()
    assert main(["sweep", "--resume", str(folder), "--analyses-out", str(tmp_path / "an"), "--launcher", "slurm",
                 "--wait"]) == 0
    assert "1 of 1 runs in 1 job(s)" in capsys.readouterr().err and len(slurm.read_jobs(folder)) == 2
    reference = tmp_path / "reference"
    slurm.wait(reference, ["seed0"], poll_s=0.5)
    ours, ref = load_run(member), load_run(reference / "seed0")
    assert ours.steps[-1] == ref.steps[-1] == 6000
    # the interrupted member also keeps the checkpoints it wrote when it was signalled
    assert set(ref.steps) < set(ours.steps) and {requeued_at.steps, stopped.steps} <= set(ours.steps)
    for step in ref.steps:
        a, b = ours.state_dict(step), ref.state_dict(step)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    pd.testing.assert_frame_equal(ours.metrics.drop(columns="time_s"), ref.metrics.drop(columns="time_s"))


@pytest.mark.slurm
def test_a_failed_job_is_named_with_its_last_line(cluster, tmp_path, capsys, tiny):
    grid = [("seed", [0, 1])]
    folder = tmp_path / "grid"
    write_manifest(folder, tiny(steps=40), grid, grid_configs(tiny(steps=40), grid))
    (folder / "seed1").mkdir()
    (folder / "seed1" / "config.json").write_text("{")  # a damaged run: its job fails on opening it
    argv = ["sweep", "--resume", str(folder), "--analyses-out", str(tmp_path / "an"), "--launcher", "slurm",
            "--members-per-job", "1", "--wait"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    job = next(j["job"] for j in slurm.read_jobs(folder) if j["members"] == ["seed1"])
    line = f"grokinterp.errors.RunError: {folder / 'seed1' / 'config.json'}: config is not valid JSON"
    assert f"failed: seed1 (job {job}): {line}" in captured.err
    assert "Missing from the results: seed1" in captured.out
    assert f"resubmit with:  grokinterp sweep --resume {folder} --launcher slurm" in captured.out
    assert main(["runs", str(folder)]) == 0
    out = capsys.readouterr().out
    assert f"{folder}: 1 finished, 1 failed" in out and line in out
