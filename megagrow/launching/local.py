"""Job steps on this machine: torchrun with `nproc` processes, its rendezvous on a free local port."""

from __future__ import annotations

import os
import sys

from megagrow.launching.base import LauncherBase, Resources
from megagrow.launching.job_step import ROOT


class LocalLauncher(LauncherBase):
    name = "local"

    def __init__(self, resources: Resources | None = None):
        pass

    def command(self, nproc: int, argv: list[str], name: str, slot) -> list[str]:
        # --standalone: torchrun picks a free port itself, so the command is the same on every run.
        return ["env", "OMP_NUM_THREADS=1", sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node", str(nproc), os.path.join(ROOT, argv[0]), *argv[1:]]

