"""Launching a distributed job step on this machine: torchrun in its own process group.

The driver only sees `JobStep`s (start, stream lines, wait, kill); a cluster launcher (srun job
steps) offers the same. Each step runs in a new session so that killing the step kills every rank,
and its process-group id is written to a file: a driver that was SIGKILLed leaves that file behind,
and the next driver kills the orphaned ranks before it resumes (two trainers must never write the
same checkpoint directory).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_stale(pid_file: str) -> None:
    """Kill the process group recorded by a previous driver, if it still runs."""
    try:
        pgid = int(open(pid_file).read().strip())
    except (OSError, ValueError):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
        print(f"killed the ranks of an interrupted run (process group {pgid})", file=sys.stderr)
        for _ in range(100):  # wait until they are gone, so their files are closed
            os.killpg(pgid, 0)
            time.sleep(0.1)
    except ProcessLookupError:
        pass
    os.remove(pid_file)


class JobStep:
    """One `torchrun --nproc-per-node N pretrain_gpt.py ...` (or any script) with its output in a log file."""

    def __init__(self, nproc: int, script_argv: list[str], log_path: str, pid_file: str, env: dict | None = None):
        self.log_path, self.pid_file = log_path, pid_file
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *script_argv]
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        with open(pid_file, "w") as f:
            f.write(str(self.proc.pid))

    def lines(self):
        """Yield the step's output lines as they come (also appended to its log)."""
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            yield line.rstrip("\n")

    def wait(self) -> int:
        rc = self.proc.wait()
        self.log.close()
        if os.path.exists(self.pid_file):
            os.remove(self.pid_file)
        return rc

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
