"""A real single-node SLURM cluster for the tests: munged, slurmctld and slurmd (Debian's packages) started in a
temporary folder with a generated slurm.conf, on free ports, and torn down afterwards. Jobs run as root on this
machine and see its filesystem, as they would on a cluster with a shared home.

Run on its own (``python tests/slurm_cluster.py``) it starts a cluster and prints the SLURM_CONF to export, for
trying ``grokinterp sweep --launcher slurm`` by hand; Ctrl-C stops it."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "srun")
APT_PACKAGES = "slurmctld slurmd slurm-client munge"


def missing() -> str | None:
    """Why a test cluster cannot be started here (None: it can)."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "SLURM runs on Linux only"
    absent = [d for d in DAEMONS if shutil.which(d, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin") is None]
    if absent:
        return f"{', '.join(absent)} not installed (apt-get install {APT_PACKAGES}; .ci/run does)"
    if os.geteuid() != 0:
        return "slurmd runs jobs as root here, and this user is not root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _which(name: str) -> str:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


class SlurmCluster:
    """``start()`` brings the cluster up (raises RuntimeError with the daemons' logs if it does not come up);
    ``env`` is what a client needs (SLURM_CONF); ``stop()`` cancels every job and ends the daemons."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root or tempfile.mkdtemp(prefix="grokinterp-slurm-"))
        self.conf = self.root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))

    def start(self, timeout: float = 60) -> "SlurmCluster":
        root = self.root
        for sub in ("munge", "state", "spool", "log"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(root / "munge", 0o700)
        key, sock = root / "munge" / "munge.key", root / "munge" / "munge.socket"
        if not key.exists():
            self._run([_which("mungekey"), "--create", f"--keyfile={key}"])
        # --force: munged wants no group/other access anywhere on the socket's path, which a temp dir may not give
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={sock}", f"--key-file={key}",
                               f"--pid-file={root / 'munge' / 'munged.pid'}", f"--seed-file={root / 'munge' / 'seed'}",
                               f"--log-file={root / 'log' / 'munged.log'}"])
        self._until(lambda: sock.exists(), timeout, "munged did not create its socket")
        host = socket.gethostname().split(".")[0]
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20 // 2
        self.conf.write_text(f"""\
ClusterName=grokinterp-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={sock}
CredType=cred/munge
StateSaveLocation={root / 'state'}
SlurmdSpoolDir={root / 'spool'}
SlurmctldPidFile={root / 'slurmctld.pid'}
SlurmdPidFile={root / 'slurmd.pid'}
SlurmctldLogFile={root / 'log' / 'slurmctld.log'}
SlurmdLogFile={root / 'log' / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
MinJobAge=600
KillWait=10
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count() or 1} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-f", str(self.conf)])
        self._until(lambda: self._ok(["scontrol", "ping"]), timeout, "slurmctld did not answer")
        self._spawn("slurmd", [_which("slurmd"), "-D", "-f", str(self.conf), "-N", host])
        self._until(lambda: "idle" in self._out(["sinfo", "-h", "-o", "%T"]), timeout, "the node did not come up idle")
        return self

    def stop(self) -> None:
        if "slurmctld" in self.procs:  # jobs first: their slurmstepd would outlive slurmd
            subprocess.run(["scancel", "--full", "--user", "root"], env=self.env, capture_output=True, timeout=30)
            self._until(lambda: not self._out(["squeue", "-h"]).strip(), 30, None)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.pop(name, None)
            if proc is None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def logs(self) -> str:
        """The daemons' logs, last lines first of each, for a failure message."""
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            lines = path.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {path.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def _spawn(self, name: str, argv: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "w")
        self.procs[name] = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            stdin=subprocess.DEVNULL)

    def _run(self, argv: list[str]) -> None:
        subprocess.run(argv, env=self.env, check=True, capture_output=True, timeout=30)

    def _ok(self, argv: list[str]) -> bool:
        try:
            return subprocess.run(argv, env=self.env, capture_output=True, timeout=10).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    def _out(self, argv: list[str]) -> str:
        try:
            return subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=10).stdout
        except subprocess.TimeoutExpired:
            return ""

    def _until(self, ready, timeout: float, failure: str | None) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead and failure:
                raise RuntimeError(f"{failure}: {', '.join(dead)} exited\n{self.logs()}")
            time.sleep(0.2)
        if failure:
            raise RuntimeError(f"{failure} within {timeout:.0f} s\n{self.logs()}")


if __name__ == "__main__":
    reason = missing()
    if reason:
        raise SystemExit(f"cannot start a test cluster: {reason}")
    cluster = SlurmCluster().start()
    print(f"SLURM test cluster up; in another shell:  export SLURM_CONF={cluster.conf}\nCtrl-C (or kill {os.getpid()}) "
          "stops it", flush=True)
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # so does kill, and Ctrl-C where a shell ignores it
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)
