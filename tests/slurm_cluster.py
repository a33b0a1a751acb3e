"""A real one-node Slurm cluster for the tests: munged, slurmctld and slurmd on this machine, all state in one folder.

Owns the cluster's files (munge key, slurm.conf, spool, state, logs, pid files) under the folder it is
given and the three daemons it starts. It stops exactly those daemons, by the pids of the processes it
started, after cancelling the jobs of its own cluster; it never touches a Slurm or munge that was
there before. Clients reach the cluster through $SLURM_CONF (set by `start`, restored by `stop`).

The configuration is the smallest that runs batch jobs, arrays, requeues and `srun -n 2` on one
node: proctrack/linuxproc, task/none, cons_tres with CR_Core, no accounting, root as SlurmUser.
The pytest fixture `slurm_cluster` (session scope; conftest.py imports it) starts one per test process
and skips, naming the packages, only where Slurm is not installed. `python tests/slurm_cluster.py DIR`
starts one by hand (Ctrl-C or `kill PID` stops it).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scancel", "scontrol")
PACKAGES = "slurm-wlm munge"


def missing_programs() -> list[str]:
    """The daemons and client commands this cluster needs that are not on PATH (daemons live in sbin)."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name, path=path) is None]


def _program(name: str) -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
    found = shutil.which(name, path=path)
    assert found, f"{name} not found"
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _memory_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(int(line.split()[1]) / 1024 * 0.9)
    return 1024


class SlurmCluster:
    """One controller and one compute node (this host, all its cores) with a default partition `debug`."""

    def __init__(self, root: Path, partition: str = "debug") -> None:
        self.root = Path(root)
        self.partition = partition
        self.host = socket.gethostname()
        self.cpus = os.cpu_count() or 1
        self.conf = self.root / "etc" / "slurm.conf"
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self._previous_conf: str | None = None

    # -- configuration ----------------------------------------------------------------------------------------
    def write_files(self) -> None:
        """The munge key and slurm.conf (no daemon is started)."""
        for sub in ("etc", "munge", "spool", "state", "log", "run"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(self.root / "munge", 0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        r = self.root
        lines = [
            "ClusterName=fastmemtest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge",
            # cred_expire: also how long a requeued job waits before it may start again (Slurm's default 120 s)
            f"AuthInfo=socket={r / 'munge' / 'munge.socket.2'},cred_expire=5",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}",
            f"SlurmctldPidFile={r / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "AccountingStorageType=accounting_storage/none", "JobAcctGatherType=jobacct_gather/none",
            "JobCompType=jobcomp/none", "MpiDefault=none", "SwitchType=switch/none",
            "SchedulerType=sched/builtin", "SchedulerParameters=sched_interval=1", "ReturnToService=2", "JobRequeue=1",
            "KillWait=5", "MinJobAge=60", "InactiveLimit=0", "SlurmctldTimeout=30", "SlurmdTimeout=30",
            "MessageTimeout=10", "SlurmctldDebug=info", "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory={_memory_mb()} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.host} Default=YES MaxTime=INFINITE State=UP",
        ]
        self.conf.write_text("\n".join(lines) + "\n")

    # -- daemons ----------------------------------------------------------------------------------------------
    def _start(self, name: str, command: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - the daemon holds it
        self.processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()

    def start(self, timeout_s: float = 60.0) -> SlurmCluster:
        """Write the files, start the three daemons, wait for the node to be idle; sets $SLURM_CONF."""
        self.write_files()
        m = self.root / "munge"
        self._start("munged", [_program("munged"), "--foreground", "--force", f"--key-file={m / 'munge.key'}",
                               f"--socket={m / 'munge.socket.2'}", f"--pid-file={m / 'munged.pid'}",
                               f"--log-file={self.root / 'log' / 'munged.log'}", f"--seed-file={m / 'munged.seed'}"])
        self._wait_for(lambda: (m / "munge.socket.2").exists(), timeout_s, "munged's socket")
        self._previous_conf = os.environ.get("SLURM_CONF")
        os.environ["SLURM_CONF"] = str(self.conf)
        self._start("slurmctld", [_program("slurmctld"), "-D", "-i", "-f", str(self.conf)])
        self._start("slurmd", [_program("slurmd"), "-D", "-f", str(self.conf)])
        self._wait_for(lambda: self.node_state() == "idle", timeout_s, "the node to be idle")
        return self

    def _wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited ({process.returncode}) while waiting for {what}: "
                                       f"{self.log_tail(name)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout_s:g} s waiting for {what}; logs in {self.root / 'log'}")
            time.sleep(0.2)

    def log_tail(self, name: str, lines: int = 5) -> str:
        texts = []
        for path in sorted((self.root / "log").glob(f"{name}*")):
            texts += path.read_text(errors="replace").strip().splitlines()[-lines:]
        return " | ".join(texts)

    def node_state(self) -> str:
        result = subprocess.run(["sinfo", "--noheader", "--nodes", self.host, "--format", "%T"],
                                capture_output=True, text=True, env={**os.environ, "SLURM_CONF": str(self.conf)},
                                timeout=30)
        return result.stdout.strip().rstrip("*~#!%$@^-")

    def env(self) -> dict[str, str]:
        """An environment whose Slurm commands talk to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def jobs(self) -> list[str]:
        """The ids of this cluster's jobs still in its queue (array tasks one by one)."""
        result = subprocess.run(["squeue", "--noheader", "--array", "--format", "%i"], capture_output=True, text=True,
                                env=self.env(), timeout=30)
        return result.stdout.split()

    def wait_idle(self, timeout_s: float = 60.0) -> None:
        """Wait for every job of this cluster to leave the queue (running or pending ones included)."""
        def empty() -> bool:
            return not [j for j in self.jobs() if j]
        self._wait_for(empty, timeout_s, "the queue to drain")

    def stop(self) -> None:
        """Cancel this cluster's jobs, then stop the daemons this object started (by pid), slurmd first."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            subprocess.run(["scancel", "--full", "--user", str(os.getuid())], env=self.env(), capture_output=True,
                           timeout=30)
            deadline = time.monotonic() + 30
            while self.jobs() and time.monotonic() < deadline:
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            process = self.processes.pop(name, None)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=20)
        if self._previous_conf is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = self._previous_conf


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A running one-node Slurm for the session's tests (skipped, with the reason, where Slurm is not installed)."""
    missing = missing_programs()
    if missing:
        pytest.skip(f"Slurm is not installed ({', '.join(missing)} not found): apt-get install {PACKAGES} "
                    f"(scripts/bootstrap.sh does where apt is usable)")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


if __name__ == "__main__":
    import signal

    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))  # `kill PID` stops the cluster too
    cluster = SlurmCluster(Path(sys.argv[1])).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
