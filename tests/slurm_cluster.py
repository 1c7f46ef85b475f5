"""A real SLURM on this machine for tests: munge, slurmctld and one slurmd per node (n1, n2), all on
127.0.0.1 (Debian's slurm-wlm; see ../shared/notes/slurm-local.md). Installed with apt when missing;
the tests skip, saying why, only where that cannot be done."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
NODES = ["n1", "n2"]


def _run(*cmd, check=True, timeout=300, **kw):
    return subprocess.run(list(cmd), capture_output=True, text=True, check=check, timeout=timeout, **kw)


def ensure_installed() -> str | None:
    """None when SLURM is there (installing it if need be), else why it cannot be."""
    if shutil.which("sbatch") and os.path.exists("/usr/sbin/slurmctld") and os.path.exists("/usr/sbin/munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and this is not a root Debian machine to apt-get it on"
    try:
        _run("apt-get", "update", "-qq")
        _run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES,
             env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        return f"apt-get install {' '.join(PACKAGES)} failed: {getattr(e, 'stderr', '') or e}"
    return None


def _conf(d: str, cpus: int) -> str:
    host = socket.gethostname().split(".")[0]
    return "\n".join([
        "ClusterName=megagrow-test", "SlurmctldHost=localhost", "SlurmUser=root", "SlurmdUser=root",
        "AuthType=auth/munge", "CredType=cred/munge", f"StateSaveLocation={d}/state",
        f"SlurmdSpoolDir={d}/spool-%n", f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd-%n.pid",
        f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd-%n.log", "SlurmctldPort=16817",
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "SchedulerType=sched/backfill", "SwitchType=switch/none", "MpiDefault=none",
        "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none", "ReturnToService=2", "InactiveLimit=0", "KillWait=10", "MinJobAge=300",
        "MailProg=/bin/true", "SlurmdParameters=config_overrides",
        f"NodeName=n[1-2] NodeHostname={host} NodeAddr=127.0.0.1 Port=[17001-17002] CPUs={cpus} "
        "RealMemory=4000 State=UNKNOWN",
        "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP", ""])


class LocalSlurm:
    def __init__(self, workdir: str, cpus: int = 2):
        self.dir = workdir
        os.makedirs(f"{workdir}/state", exist_ok=True)
        self.conf = f"{workdir}/slurm.conf"
        with open(self.conf, "w") as f:
            f.write(_conf(workdir, cpus))
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def start(self) -> None:
        with open("/etc/hosts") as f:
            hosts = f.read()
        if not all(f" {n}" in hosts for n in NODES):  # steps rendezvous at their first node's name
            with open("/etc/hosts", "a") as f:
                f.write("127.0.0.1 " + " ".join(NODES) + "\n")
        if _run("pgrep", "-x", "munged", check=False).returncode != 0:
            os.makedirs("/run/munge", exist_ok=True)
            shutil.chown("/run/munge", "munge", "munge")
            _run("runuser", "-u", "munge", "--", "/usr/sbin/munged")
        _run("/usr/sbin/slurmctld", env=self.env)
        for node in NODES:
            _run("/usr/sbin/slurmd", "-N", node, env=self.env)
        for _ in range(100):
            out = _run("sinfo", "-h", "-o", "%t %D", check=False, env=self.env).stdout.split()
            if out[:1] == ["idle"] and out[1:2] == [str(len(NODES))]:
                return
            time.sleep(0.2)
        raise RuntimeError(f"SLURM nodes did not become idle: {out}")

    def stop(self) -> None:
        for name in [f"slurmd-{n}" for n in NODES] + ["slurmctld"]:
            try:
                pid = int(open(f"{self.dir}/{name}.pid").read())
                os.kill(pid, 15)
                for _ in range(50):
                    os.kill(pid, 0)
                    time.sleep(0.1)
            except (OSError, ValueError):
                pass

    def sbatch(self, script: str, *args: str) -> str:
        out = _run("sbatch", "--parsable", *args, script, env=self.env)
        return out.stdout.strip().split(";")[0]

    def state(self, job: str) -> str:
        out = _run("scontrol", "show", "job", job, check=False, env=self.env).stdout
        for item in out.split():
            if item.startswith("JobState="):
                return item.split("=", 1)[1]
        return "GONE"

    def wait(self, job: str, timeout: float = 600) -> str:
        end = time.time() + timeout
        while time.time() < end:
            state = self.state(job)
            if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED"):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job} still {state} after {timeout} s")
