"""Job steps inside a SLURM allocation: `srun` on a subset of the allocation's nodes.

Each step gets whole nodes of its own (`--nodelist`, `--exclusive`: concurrent steps such as LAG
probes never share cores or GPUs), one task per rank, and its rendezvous at the first of its nodes
(the allocation's node list) on a port no other running step of this driver uses. Ranks come from
SLURM's variables (`slurm_ranks`, called by pretrain_gpt.py): SLURM_PROCID -> RANK, SLURM_NTASKS ->
WORLD_SIZE, SLURM_LOCALID -> LOCAL_RANK. Killing a step cancels it with `scancel` (killing srun alone
can leave its tasks behind).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import signal
import subprocess
import sys

from megagrow.launching.local import ROOT, JobStep
from megagrow.scheduling.timing import PlanError

_BASE_PORT = 29400


def slurm_ranks(env=os.environ) -> None:
    """torch.distributed's variables from srun's, for ranks srun started directly (no torchrun)."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    env.setdefault("MASTER_ADDR", "127.0.0.1")


def in_allocation() -> bool:
    return "SLURM_JOB_ID" in os.environ and shutil.which("srun") is not None


def hostnames(nodelist: str) -> list[str]:
    """`scontrol show hostnames`, parsed here (it needs no controller): n[1-3,07],login -> n1 n2 n3 n07 login."""
    names = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", nodelist):
        m = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not m:
            names.append(item)
            continue
        prefix, ranges, suffix = m.groups()
        for r in ranges.split(","):
            lo, _, hi = r.partition("-")
            for i in range(int(lo), int(hi or lo) + 1):
                names.append(f"{prefix}{i:0{len(lo)}d}{suffix}")
    return names


class SlurmLauncher:
    """Steps on free nodes of the current allocation; `nproc_per_node` ranks per node."""
    kind = "slurm"

    def __init__(self, nodes: list[str] | None = None, nproc_per_node: int | None = None, dry_run=None):
        env = os.environ
        self.nodes = nodes or hostnames(env["SLURM_JOB_NODELIST"])
        gpus = env.get("SLURM_GPUS_ON_NODE")
        self.per_node = nproc_per_node or int(gpus or env.get("SLURM_NTASKS_PER_NODE", "1").split("(")[0])
        self.cpus = int(env.get("SLURM_CPUS_ON_NODE", "0") or 0)
        self.gpus = int(gpus) if gpus else 0
        self.busy: set[str] = set()
        self.ports = itertools.count(_BASE_PORT + int(env.get("SLURM_JOB_ID", "0")) % 500)
        self.serial = itertools.count()  # unique step names: scancel finds a step by its name
        self.dry_run = dry_run  # a list: commands are recorded there, not run

    def command(self, nproc: int, script_argv: list[str], name: str) -> tuple[list[str], list[str]]:
        per_node = min(self.per_node, nproc)
        if nproc % per_node:
            raise PlanError(f"{name}: {nproc} processes do not fill nodes of {per_node}")
        count = nproc // per_node
        free = [n for n in self.nodes if n not in self.busy]
        if count > len(free):
            raise PlanError(f"{name}: needs {count} nodes of {per_node} processes, {len(free)} of the allocation's "
                            f"{len(self.nodes)} are free")
        nodes = free[:count]
        cmd = ["srun", f"--job-name={name}", f"--nodes={count}", f"--ntasks={nproc}",
               f"--ntasks-per-node={per_node}", f"--nodelist={','.join(nodes)}", "--exclusive",
               "--kill-on-bad-exit=1", "--export=ALL,OMP_NUM_THREADS=1,"
               f"MASTER_ADDR={nodes[0]},MASTER_PORT={next(self.ports)}"]
        if self.cpus:
            cmd.append(f"--cpus-per-task={max(1, self.cpus // per_node)}")
        if self.gpus:
            cmd.append(f"--gpus-per-node={per_node}")
        return cmd + [sys.executable, os.path.join(ROOT, script_argv[0]), *script_argv[1:]], nodes

    def start(self, nproc: int, script_argv: list[str], log_path: str, pid_file: str, on_line=None,
              name: str = "step"):
        name = f"megagrow-{name}-{next(self.serial)}"
        cmd, nodes = self.command(nproc, script_argv, name)
        if self.dry_run is not None:
            self.dry_run.append(cmd)
            return None
        self.busy.update(nodes)
        step = JobStep(cmd, log_path, pid_file, on_line, on_exit=lambda: self.busy.difference_update(nodes))
        # Signals go to the step's tasks through slurmctld: a signal to srun itself cancels the step at once.
        step.kill = lambda: (_scancel(name, "KILL"), JobStep.kill(step))
        step.signal = lambda sig: _scancel(name, signal.Signals(sig).name[3:])
        return step


def _scancel(name: str, sig: str) -> None:
    """Signal the step called `name` (its tasks, not srun)."""
    job = os.environ.get("SLURM_JOB_ID")
    out = subprocess.run(["squeue", "-h", "-s", "-j", job, "-o", "%i %j"], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        step_id, _, step_name = line.partition(" ")
        if step_name.strip() == name:
            subprocess.run(["scancel", f"--signal={sig}", step_id], capture_output=True)


def make_launcher(kind: str = "auto"):
    from megagrow.launching.local import LocalLauncher
    if kind == "slurm" or (kind == "auto" and in_allocation()):
        if not in_allocation():
            raise PlanError("--launcher slurm: not inside a SLURM allocation (no SLURM_JOB_ID or no srun)")
        return SlurmLauncher()
    return LocalLauncher()
