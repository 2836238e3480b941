"""A throwaway one-node Slurm cluster for tests: munged, slurmctld and slurmd as root, every
file (config, key, sockets, state, spool, logs) in one temporary directory, free TCP ports.

It touches nothing system-wide: munged gets its own key and socket (``AuthInfo=socket=``), the
daemons their own ports, and the clients find the cluster through ``SLURM_CONF``. When the
binaries are missing it installs Debian's ``slurm-wlm`` and ``munge`` with apt (CI runs as root
on a fresh machine). :meth:`Slurm.stop` cancels the jobs, shuts the daemons down and checks
that the processes it started are gone.

    with Slurm.start() as slurm:
        job = slurm.sbatch(["--wrap", "hostname"])
        slurm.wait(job, {"COMPLETED"}, timeout=60)
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "scancel", "squeue")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
                "PREEMPTED"}  # fmt: skip


class SlurmUnavailable(RuntimeError):
    """Slurm cannot run here (not root, or apt cannot install it): the tier is skipped."""


def ensure_installed() -> None:
    """Install slurm-wlm and munge with apt when a binary is missing (root only)."""
    if all(shutil.which(b) for b in BINARIES):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("slurm-wlm/munge are not installed and installing them with apt needs root")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("slurm-wlm/munge are not installed and apt-get is not available")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "slurm-wlm", "munge"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:  # a fresh machine may have no package lists yet
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, text=True, timeout=600)
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    missing = [b for b in BINARIES if not shutil.which(b)]
    if out.returncode != 0 or missing:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SlurmUnavailable(f"apt-get install slurm-wlm munge failed (rc {out.returncode}): {tail[0]}")


def _node_name() -> str:
    """The short host name, as on a real cluster; ``localhost`` where it does not resolve (the
    ranks find their master by resolving the first name of the node list)."""
    host = socket.gethostname().split(".")[0]
    try:
        socket.getaddrinfo(host, None)
        return host
    except OSError:
        return "localhost"


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _conf(root: Path, host: str, cpus: int, ctld_port: int, slurmd_port: int) -> str:
    return f"""\
ClusterName=copdtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket,cred_expire=10
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
KillWait=10
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=2
PlugStackConfig={root}/plugstack.conf
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    """A running throwaway cluster; ``env`` is what clients need (``SLURM_CONF``)."""

    root: Path
    env: dict[str, str]
    pids: dict[str, int] = field(default_factory=dict)

    @classmethod
    def start(cls, cpus: int | None = None, timeout: float = 60.0) -> "Slurm":
        ensure_installed()
        if os.geteuid() != 0:
            raise SlurmUnavailable("slurmd must run as root to launch jobs")
        root = Path(tempfile.mkdtemp(prefix="copd-slurm-"))  # short: unix socket paths are limited
        for d in ("munge", "state", "spool", "log"):
            (root / d).mkdir()
        os.chmod(root, 0o755)
        os.chmod(root / "munge", 0o700)
        host = _node_name()
        (root / "spool" / host).mkdir()
        ctld_port, slurmd_port = _free_ports(2)
        (root / "slurm.conf").write_text(_conf(root, host, cpus or os.cpu_count() or 1, ctld_port, slurmd_port))
        (root / "plugstack.conf").write_text("")  # not the system's SPANK plugins
        env = {**os.environ, "SLURM_CONF": str(root / "slurm.conf")}
        slurm = cls(root, env)
        try:
            slurm._start_munge()
            slurm._daemon("slurmctld", ["slurmctld", "-f", str(root / "slurm.conf")], root / "slurmctld.pid")
            slurm._daemon("slurmd", ["slurmd", "-f", str(root / "slurm.conf"), "-N", host], root / "slurmd.pid")
            slurm._wait_node_idle(host, timeout)
        except BaseException:
            slurm.stop()
            raise
        return slurm

    def _start_munge(self) -> None:
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o600)
        m = self.root / "munge"
        cmd = ["munged", "--force", f"--socket={m}/munge.socket", f"--key-file={key}", f"--pid-file={m}/munged.pid",
               f"--log-file={self.root}/log/munged.log", f"--seed-file={m}/munged.seed"]  # fmt: skip
        self._daemon("munged", cmd, m / "munged.pid")

    def _daemon(self, name: str, cmd: list[str], pid_file: Path) -> None:
        """Start a daemonising binary and record its pid from its pid file."""
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if pid_file.is_file() and pid_file.read_text().strip().isdigit():
                self.pids[name] = int(pid_file.read_text().strip())
                return
            time.sleep(0.1)
        raise RuntimeError(f"{name} did not start (rc {out.returncode}): {out.stderr.strip()[-500:]}\n{self.logs(name)}")

    def _wait_node_idle(self, host: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = ""
        while time.monotonic() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-n", host, "-o", "%T"], check=False)
            state = out.stdout.strip()
            if state.startswith("idle"):
                return
            time.sleep(0.5)
        raise RuntimeError(f"node {host} is not idle after {timeout:.0f}s (state {state!r})\n{self.logs('slurmctld')}")

    # -- clients ----------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        out = subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw)
        if check and out.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed (rc {out.returncode}): {out.stderr.strip()}")
        return out

    def sbatch(self, args: list[str], env: dict[str, str] | None = None, cwd: str | Path | None = None) -> int:
        """Submit; returns the job id."""
        out = self.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """``scontrol show job`` as a dict (JobState, Restarts, ExitCode, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)])
        return dict(kv.split("=", 1) for kv in out.stdout.split() if "=" in kv)

    def wait(self, job_id: int, states: set[str], timeout: float) -> dict[str, str]:
        """Poll until the job is in one of ``states``; fail early on another final state."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if info.get("JobState") in FINAL_STATES:
                break
            time.sleep(0.5)
        raise AssertionError(
            f"job {job_id} is {info.get('JobState')} (reason {info.get('Reason')}, exit {info.get('ExitCode')}), "
            f"expected {sorted(states)} within {timeout:.0f}s"
        )

    def logs(self, name: str, lines: int = 30) -> str:
        path = self.root / "log" / f"{name}.log"
        text = path.read_text(errors="replace").splitlines()[-lines:] if path.is_file() else ["(no log)"]
        return f"--- {name}.log ---\n" + "\n".join(text)

    # -- teardown ---------------------------------------------------------------------------
    def stop(self) -> None:
        """Cancel every job, stop the daemons (then kill what is left by pid), remove the files."""
        if "slurmctld" in self.pids:
            self.run(["scancel", "--full", "--user", "root"], check=False)
            self._wait_no_jobs(30)
            self.run(["scontrol", "shutdown"], check=False)
        for name in ("slurmd", "slurmctld", "munged"):
            pid = self.pids.pop(name, None)
            if pid is not None:
                _stop_pid(pid)
        shutil.rmtree(self.root, ignore_errors=True)

    def _wait_no_jobs(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.run(["squeue", "-h", "-o", "%i"], check=False)
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(0.5)

    def __enter__(self) -> "Slurm":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _stop_pid(pid: int, grace: float = 15.0) -> None:
    """SIGTERM, wait, then SIGKILL one process we started (never anything by name)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
