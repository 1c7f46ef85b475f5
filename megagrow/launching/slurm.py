"""Job steps inside a SLURM allocation: `srun` on whole nodes of the allocation.

Each step gets whole nodes of its own (`--relative` picks them by their index in the allocation,
`--exclusive`: concurrent steps such as LAG probes never share cores or GPUs), one task per rank.
The ranks find their rendezvous from the step itself (runtime.ranks: the step's first node, a port
from the job and step ids), so the srun line names no host or port: `megagrow run --launcher slurm
--dry-run --nodes N` prints, outside an allocation, the lines the driver runs inside one. Killing a
step cancels it with `scancel` (killing srun alone can leave its tasks behind).
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
import sys

from megagrow.errors import LaunchError
from megagrow.launching.base import LauncherBase, Resources
from megagrow.launching.job_step import ROOT, JobStep
from megagrow.runtime.ranks import hostnames


def in_allocation() -> bool:
    return "SLURM_JOB_ID" in os.environ and shutil.which("srun") is not None


def _first_int(value: str | None) -> int | None:
    """SLURM's per-node counts look like `4(x2)`: the first number."""
    return int(value.split("(")[0]) if value else None


class SlurmLauncher(LauncherBase):
    """Steps on free nodes of the allocation (or, for a dry run, of one with `resources.nodes` nodes)."""
    name = "slurm"
    applies_here = staticmethod(in_allocation)  # `--launcher auto` picks srun inside an allocation

    def __init__(self, resources: Resources | None = None):
        r, env = resources or Resources(), os.environ
        inside = in_allocation()
        if not inside and r.nodes is None:
            raise LaunchError("--launcher slurm: not inside a SLURM allocation (no SLURM_JOB_ID or no srun); "
                              "give --nodes N (and --nproc-per-node) to print its commands with --dry-run")
        self.nodes = r.nodes or len(hostnames(env["SLURM_JOB_NODELIST"]))
        gpus = r.gpus_per_node if r.gpus_per_node is not None else _first_int(env.get("SLURM_GPUS_ON_NODE"))
        self.gpus = gpus or 0
        self.per_node = r.nproc_per_node or gpus or _first_int(env.get("SLURM_NTASKS_PER_NODE")) or 1
        cpus = r.cpus_per_node if r.cpus_per_node is not None else _first_int(env.get("SLURM_CPUS_ON_NODE"))
        self.cpus = cpus or 0
        self.busy: set[int] = set()
        self.serial = itertools.count()  # unique step names: scancel finds a step by its name

    def step_name(self, name: str) -> str:
        return f"megagrow-{name}-{next(self.serial)}"

    def _count(self, nproc: int, name: str) -> tuple[int, int]:
        per_node = min(self.per_node, nproc)
        if nproc % per_node:
            raise LaunchError(f"{name}: {nproc} processes do not fill nodes of {per_node}")
        return nproc // per_node, per_node

    def reserve(self, nproc: int, name: str) -> range:
        count, per_node = self._count(nproc, name)
        for first in range(self.nodes - count + 1):
            nodes = range(first, first + count)
            if not self.busy.intersection(nodes):
                self.busy.update(nodes)
                return nodes
        raise LaunchError(f"{name}: needs {count} nodes of {per_node} processes; {self.nodes - len(self.busy)} of "
                          f"the allocation's {self.nodes} are free")

    def release(self, slot: range) -> None:
        self.busy.difference_update(slot)

    def command(self, nproc: int, argv: list[str], name: str, slot: range) -> list[str]:
        count, per_node = self._count(nproc, name)
        cmd = ["srun", f"--job-name={name}", f"--nodes={count}", f"--ntasks={nproc}",
               f"--ntasks-per-node={per_node}", f"--relative={slot.start}", "--exclusive", "--kill-on-bad-exit=1",
               "--export=ALL,OMP_NUM_THREADS=1"]
        if self.cpus:
            cmd.append(f"--cpus-per-task={max(1, self.cpus // per_node)}")
        if self.gpus:
            cmd.append(f"--gpus-per-node={per_node}")
        return cmd + [sys.executable, os.path.join(ROOT, argv[0]), *argv[1:]]

    def launch(self, cmd: list[str], log_path: str, pid_file: str, on_line, name: str, on_exit) -> JobStep:
        step = JobStep(cmd, log_path, pid_file, on_line, on_exit=on_exit)
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

