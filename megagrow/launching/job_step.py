"""One launched job step: all ranks of one command, in their own process group, logged to a file.

Each step runs in a new session so that killing the step kills every rank, and its process-group
id is written to a file: a driver that was SIGKILLed leaves that file behind, and the next driver
kills the orphaned ranks before it resumes (two trainers must never write the same checkpoint
directory). The log's first line is the command itself, as `megagrow run --dry-run` prints it.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
COMMAND_PREFIX = "$ "  # marks the command line at the top of a step's log


class Interrupted(Exception):
    """SIGTERM/SIGUSR1 reached the driver: the running steps saved their checkpoints; re-run to resume."""


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
    """One launched command whose output goes to a log file (and `on_line`); `on_exit` runs once it ended."""

    def __init__(self, cmd: list[str], log_path: str, pid_file: str, on_line=None, on_exit=None):
        self.log_path, self.pid_file, self.started, self.on_exit = log_path, pid_file, time.time(), on_exit
        self.cmd = cmd
        self.log = open(log_path, "a")
        self.log.write(COMMAND_PREFIX + shlex.join(cmd) + "\n")
        self.log.flush()
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
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
