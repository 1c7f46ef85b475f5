"""Where a rank learns who it is and where to meet: torchrun's variables, or srun's when srun started
the ranks directly (one task per rank, no torchrun).

For srun steps the rendezvous is derived here, from the step itself: the first host of the step's
node list, and a port that is a function of the job and step ids, so a launcher's srun line names
no host or port and reads the same before and inside an allocation.
"""

from __future__ import annotations

import os
import re
import socket

SRUN_BASE_PORT = 20000
SRUN_PORTS = 20000  # ports SRUN_BASE_PORT .. +SRUN_PORTS: one per (job, step), below the ephemeral range


def free_port() -> int:
    """A TCP port nobody listens on now (for a rendezvous on this machine)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def srun_port(job_id: int, step_id: int) -> int:
    return SRUN_BASE_PORT + (job_id * 64 + step_id) % SRUN_PORTS


def discover_ranks(env=os.environ) -> None:
    """Fill torch.distributed's variables from srun's for ranks srun started directly (SLURM_PROCID ->
    RANK, SLURM_NTASKS -> WORLD_SIZE, SLURM_LOCALID -> LOCAL_RANK); torchrun's ranks are left alone."""
    if "RANK" in env or "SLURM_PROCID" not in env or "SLURM_STEP_ID" not in env:
        return
    env["RANK"], env["WORLD_SIZE"] = env["SLURM_PROCID"], env["SLURM_NTASKS"]
    env["LOCAL_RANK"] = env.get("SLURM_LOCALID", "0")
    nodes = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    env.setdefault("MASTER_ADDR", hostnames(nodes)[0] if nodes else "127.0.0.1")
    step = env["SLURM_STEP_ID"]
    env.setdefault("MASTER_PORT", str(srun_port(int(env.get("SLURM_JOB_ID", "0")), int(step) if step.isdigit() else 0)))
