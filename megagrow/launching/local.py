"""Launching a distributed job step on this machine: torchrun in its own process group.

The driver only sees a launcher's `start(...)` and the `JobStep` it returns (poll, wait, signal,
kill); `launching.slurm` offers the same with srun job steps inside an allocation. Each step runs in a new session so that killing the step kills every rank,
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
import threading
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
    """One launched command (all ranks of a job step) whose output goes to a log file (and `on_line`)."""

    def __init__(self, cmd: list[str], log_path: str, pid_file: str, on_line=None, env: dict | None = None,
                 on_exit=None):
        self.log_path, self.pid_file, self.started, self.on_exit = log_path, pid_file, time.time(), on_exit
        self.cmd = cmd
        self.log = open(log_path, "a")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
        with open(pid_file, "w") as f:
            f.write(str(self.proc.pid))
        # A reader thread per step: concurrent steps never block on a full pipe.
        self._reader = threading.Thread(target=self._read, args=(on_line,), daemon=True)
        self._reader.start()

    def _read(self, on_line) -> None:
        for line in self.proc.stdout:
            self.log.write(line)
            self.log.flush()
            if on_line:
                on_line(line.rstrip("\n"))

    def poll(self) -> int | None:
        return self.proc.poll()

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if the step still runs after `timeout` seconds."""
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None
        self._reader.join()
        self.log.close()
        if os.path.exists(self.pid_file):
            os.remove(self.pid_file)
        if self.on_exit:
            self.on_exit()
            self.on_exit = None
        return rc

    def signal(self, sig: int) -> None:
        """Pass a signal to every rank (a stage saves and exits on SIGTERM/SIGUSR1)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class LocalLauncher:
    """Job steps on this machine: torchrun with `nproc` processes."""
    kind = "local"

    def start(self, nproc: int, script_argv: list[str], log_path: str, pid_file: str, on_line=None,
              name: str = "step") -> JobStep:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-addr", "127.0.0.1", "--master-port", str(free_port()), *script_argv]
        return JobStep(cmd, log_path, pid_file, on_line)
