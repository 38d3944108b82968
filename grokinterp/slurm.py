"""Sweeps on a SLURM cluster, through submitit (``grokinterp sweep --launcher slurm``).

The sweep's unfinished members are split into groups of ``members_per_job`` and submitted as one job array; each
array task trains its group with ``sweep.train_members`` (stacked where they can be), into the sweep folder on the
shared filesystem. submitit's pickles and the jobs' logs go to ``<sweep>/slurm/``, and ``<sweep>/slurm/jobs.jsonl``
records which job trains which members, so ``sweep_status`` can tell queued, running, finished and failed members
apart from the run folders, ``squeue`` and the jobs' logs (no accounting database needed).

Preemption and time limits. submitit asks SLURM to send SIGUSR2 ``signal_delay_s`` before the time limit
(``sbatch --signal``); its handler re-dumps the job's call and ``scontrol requeue``s the job. While members train,
the job's own handler catches the signal first: every member in training is saved at its current step, then the
signal is raised again for submitit's handler, which requeues the job. The requeued job makes the same call, which
skips the members that finished and resumes the others from their last checkpoint, bit-exactly. SIGTERM (``scancel``,
or a preemption) saves the members the same way and ends the job: SLURM requeues a preempted job itself, and
``grokinterp sweep --resume SWEEP --launcher slurm`` resubmits what a cancelled or failed job left unfinished.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from grokinterp.checkpoints import RunStore, write_text_atomic
from grokinterp.errors import GrokinterpError, RunError

log = logging.getLogger(__name__)

JOBS_DIR = "slurm"  # submitit's folder under the sweep folder: submitted pickles, logs, results
JOBS_FILE = "jobs.jsonl"  # one line per job: its id and the members it trains
MAX_TIMEOUTS = 100
"""Requeues after a time limit that submitit allows before it gives a job up. Each one resumes from checkpoints
saved at the signal, so every requeue makes progress; the cap only ends a job that keeps timing out."""
POLL_S = 10.0  # seconds between squeue calls while `sweep --wait` waits
QUEUED = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
RUNNING = {"RUNNING", "COMPLETING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT", "RESIZING"}
INSTALL_SUBMITIT = "pip install 'grokinterp[slurm]' (or pip install submitit)"


class LauncherError(GrokinterpError):
    """A launcher that cannot be used here (submitit or SLURM missing, sbatch refusing the jobs)."""


@dataclass(frozen=True)
class SlurmOptions:
    """What each job of the array asks SLURM for."""

    partition: str | None = None
    """Partition to submit to (None: the cluster's default)."""
    time_min: int = 60
    """Time limit of each job, in minutes; a job that reaches it saves its members and requeues itself."""
    gpus_per_job: int = 0
    cpus_per_job: int = 1
    """CPU cores of each job; torch uses this many threads."""
    array_parallelism: int = 64
    """Most jobs of the array running at once."""
    members_per_job: int = 16
    """Sweep members each job trains (stacked ``group_size`` at a time)."""
    signal_delay_s: int = 120
    """Seconds before the time limit at which SLURM sends SIGUSR2 (time to save and requeue)."""
    extra: dict[str, str] = field(default_factory=dict)
    """Further sbatch options, e.g. {"account": "lab", "qos": "low", "constraint": "a100"}."""


def check_available() -> None:
    """Refuse, in one line naming what to install, a machine that cannot submit SLURM jobs."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise LauncherError(f"--launcher slurm needs submitit: {INSTALL_SUBMITIT}") from None
    if shutil.which("sbatch") is None:
        raise LauncherError("--launcher slurm needs SLURM's sbatch on the PATH: run on the cluster's login node, "
                            "or install the SLURM client (Debian/Ubuntu: apt-get install slurm-client)")


# -- the job ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MemberJob:
    """One array task: trains ``names`` of the sweep in ``folder``. submitit pickles the call and runs it on a node;
    ``checkpoint`` makes the job requeueable (submitit calls it on SIGUSR2 and submits what it returns again)."""

    folder: str
    device: str
    group_size: int

    def __call__(self, names: list[str]) -> dict:
        import torch

        from grokinterp.sweep import train_members

        _log_to_stderr()
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:  # torch would take every core of the node, not the job's share
            torch.set_num_threads(int(cpus))
        requeue_on = _requeue_signal()
        log.info("training %d member(s) of %s (restart %s): %s", len(names), self.folder,
                 os.environ.get("SLURM_RESTART_COUNT", "0"), ", ".join(names))
        done = train_members(self.folder, names, device=self.device, progress=False, group_size=self.group_size,
                             signals=(requeue_on, signal.SIGTERM))
        for r in done.results:
            log.info("%s: %s at step %d", r.run.name, r.stop_reason, r.step)
        if done.stopped_by == requeue_on:
            log.info("members saved; handing %s to submitit, which requeues the job", signal.Signals(requeue_on).name)
            signal.raise_signal(requeue_on)  # submitit's handler is back in place: it requeues the job and exits
        if done.stopped_by is not None:
            log.info("stopped by %s; members saved (resubmit with grokinterp sweep --resume %s --launcher slurm)",
                     signal.Signals(done.stopped_by).name, self.folder)
        return {r.run.name: r.stop_reason for r in done.results}

    def checkpoint(self, names: list[str]):
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, names)  # the same call: each member resumes from its own last checkpoint


def _log_to_stderr() -> None:
    """grokinterp's log lines into the job's stderr log (submitit's own go to its stdout log)."""
    logger = logging.getLogger("grokinterp")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _requeue_signal() -> int:
    """The signal submitit requeues on (SIGUSR2 unless SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    from submitit.core.job_environment import JobEnvironment

    return JobEnvironment._usr_sig()


# -- submitting ---------------------------------------------------------------------------------------------------
def plan_jobs(folder: Path, names: Sequence[str], members_per_job: int) -> list[list[str]]:
    """The members of each job: stackable members side by side (as ``sweep.plan_groups`` orders them), cut into
    jobs of ``members_per_job``."""
    from grokinterp.sweep import member_state, plan_groups, read_manifest

    by_name = {m.name: m for m in read_manifest(folder)}
    configs = [by_name[n].config for n in names]
    resume = [member_state(folder, n, by_name[n].config.train.steps) == "partial" for n in names]
    order = [names[i] for group in plan_groups(configs, [folder / n for n in names], resume, len(names) or 1)
             for i in group]
    return [order[i : i + members_per_job] for i in range(0, len(order), members_per_job)]


def submit(folder: Path, names: Sequence[str], options: SlurmOptions, *, device: str, group_size: int) -> list[str]:
    """Submit the named members as one job array (one job if they fit in one); returns the job ids."""
    import submitit
    from submitit.core.utils import FailedJobError

    folder = folder.resolve()
    batches = plan_jobs(folder, list(names), options.members_per_job)
    executor = submitit.SlurmExecutor(folder=folder / JOBS_DIR, max_num_timeout=MAX_TIMEOUTS)
    executor.update_parameters(
        job_name=f"grokinterp-{folder.name}", time=options.time_min, cpus_per_task=options.cpus_per_job,
        gpus_per_node=options.gpus_per_job or None, partition=options.partition,
        array_parallelism=options.array_parallelism, signal_delay_s=options.signal_delay_s,
        additional_parameters=dict(options.extra))
    try:
        jobs = executor.map_array(MemberJob(str(folder), device, group_size), batches)
    except FailedJobError as err:
        raise LauncherError(f"sbatch refused the jobs: {_last_line(str(err)) or err}") from None
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S")
    record_jobs(folder, [{"job": job.job_id, "members": batch, "submitted": stamp} for job, batch in zip(jobs, batches)])
    return [job.job_id for job in jobs]


def record_jobs(folder: Path, records: list[dict]) -> None:
    path = folder / JOBS_DIR / JOBS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    before = path.read_text() if path.exists() else ""
    write_text_atomic(path, before + "".join(json.dumps(r) + "\n" for r in records))


def read_jobs(folder: Path) -> list[dict]:
    """The jobs submitted for the sweep in ``folder``, oldest first (none if it never went to SLURM)."""
    path = Path(folder) / JOBS_DIR / JOBS_FILE
    if not path.exists():
        return []
    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            jobs.append({"job": str(record["job"]), "members": [str(n) for n in record["members"]]})
        except (ValueError, KeyError, TypeError):
            raise RunError(f"{path} line {number} is damaged; remove that line (its job's members then show as "
                           "not submitted)") from None
    return jobs


# -- status -------------------------------------------------------------------------------------------------------
def job_states(job_ids: Sequence[str]) -> dict[str, str]:
    """SLURM's state of each job still known to it (PENDING, RUNNING, COMPLETED, ...), from ``squeue``; jobs it has
    forgotten are left out. Raises LauncherError if squeue is missing or fails."""
    if not job_ids:
        return {}
    if shutil.which("squeue") is None:
        raise LauncherError("squeue is not on the PATH, so queued and running jobs cannot be told apart")
    bases = sorted({j.split("_")[0] for j in job_ids})
    # -r: one line per array task; -t all: ended jobs too (SLURM keeps them for MinJobAge, 300 s by default)
    out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i %T", "-j", ",".join(bases)],
                         capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        if "Invalid job id" in out.stderr:  # every one of them is gone from the controller's memory
            return {}
        raise LauncherError(f"squeue failed: {_last_line(out.stderr) or f'exit code {out.returncode}'}")
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split()
        if len(parts) == 2:
            states[parts[0]] = parts[1]
    return states


@dataclass(frozen=True)
class MemberStatus:
    name: str
    state: str
    """'finished', 'queued', 'running', 'failed', 'stopped' (started, not finished, no job at work on it) or 'new'."""
    steps: int
    """Steps trained (at the last checkpoint)."""
    job: str | None
    """The SLURM job that last had it (None: never submitted)."""
    note: str = ""
    """For a failed member, the last line its job wrote (or SLURM's state of the job)."""


def job_logs(folder: Path, job: str) -> tuple[Path, Path]:
    """The stdout and stderr logs submitit keeps for job ``job`` (array tasks and lone jobs alike:
    ``<id>_<task 0>_log.out``): submitit's own lines go to stdout, the job's log lines and tracebacks to stderr."""
    base = Path(folder) / JOBS_DIR / f"{job}_0_log"
    return base.with_suffix(".out"), base.with_suffix(".err")


def sweep_status(folder: str | os.PathLike) -> tuple[list[MemberStatus], str]:
    """Each member's status, and a note when the queue could not be read (then a member whose job is not known to
    have ended shows as 'stopped' or 'new')."""
    from grokinterp.sweep import member_state, read_manifest

    folder = Path(folder)
    members = read_manifest(folder)
    latest = {}
    for record in read_jobs(folder):
        for name in record["members"]:
            latest[name] = record["job"]
    pending = [latest[m.name] for m in members
               if m.name in latest and member_state(folder, m.name, m.config.train.steps) != "finished"]
    note = ""
    try:
        states = job_states(pending)
    except (LauncherError, OSError, subprocess.SubprocessError) as err:
        states, note = {}, f"queue unknown ({err})"
    out = []
    for m in members:
        disk = member_state(folder, m.name, m.config.train.steps)
        steps = _steps(folder / m.name)
        job = latest.get(m.name)
        slurm = states.get(job) if job else None
        if disk == "finished":
            out.append(MemberStatus(m.name, "finished", steps, job))
        elif slurm in QUEUED:
            out.append(MemberStatus(m.name, "queued", steps, job, slurm.lower() if slurm != "PENDING" else ""))
        elif slurm in RUNNING:
            out.append(MemberStatus(m.name, "running", steps, job))
        elif job is None or note:
            out.append(MemberStatus(m.name, "stopped" if disk == "partial" else "new", steps, job))
        else:
            out.append(_ended(folder, m.name, disk, steps, job, slurm))
    return out, note


def _ended(folder: Path, name: str, disk: str, steps: int, job: str, slurm: str | None) -> MemberStatus:
    """A member whose job has ended without finishing it: stopped if the job ended cleanly (a SIGTERM saved it),
    failed otherwise, with the last line of the job's stderr (a traceback's last line, or slurmstepd's word on why
    SLURM killed it)."""
    out, err = (_last_line(_tail(p), skip="srun: ") if p.exists() else "" for p in job_logs(folder, job))
    if "successful completion" in out or "Job completed successfully" in out:  # submitit's last words on success
        return MemberStatus(name, "stopped" if disk == "partial" else "new", steps, job, (slurm or "").lower())
    reason = err or out or f"job {job} ended ({slurm or 'state unknown'}) without a log in {folder / JOBS_DIR}"
    return MemberStatus(name, "failed", steps, job, reason)


def _steps(run_dir: Path) -> int:
    if not run_dir.exists():
        return 0
    try:
        state = RunStore(run_dir).read_trainer_state()
    except RunError:
        return 0
    return 0 if state is None else state.step


def _tail(path: Path, size: int = 8192) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode("utf-8", errors="replace")


def _last_line(text: str, skip: str | None = None) -> str:
    """The last non-empty line, passing over lines that start with ``skip`` (srun's own word on its tasks, such as
    'srun: error: node1: task 0: Exited with exit code 1', follows the traceback that says why)."""
    lines = (line.strip() for line in reversed(text.splitlines()))
    return next((line for line in lines if line and not (skip and line.startswith(skip))), "")


def live(statuses: Sequence[MemberStatus]) -> list[MemberStatus]:
    return [s for s in statuses if s.state in ("queued", "running")]


def wait(folder: Path, names: Sequence[str], poll_s: float | None = None) -> list[MemberStatus]:
    """Block until none of ``names`` is queued or running; returns the sweep's statuses."""
    wanted = set(names)
    while True:
        statuses, note = sweep_status(folder)
        if note:
            raise LauncherError(f"cannot wait for the jobs: {note}")
        if not any(s.name in wanted for s in live(statuses)):
            return statuses
        time.sleep(POLL_S if poll_s is None else poll_s)
