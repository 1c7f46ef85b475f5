"""The launcher contract, and the registry of launchers by name.

A launcher turns "run this trainer command on N processes" into a job step: it reserves room for
the step (`reserve`), renders the exact command (`command`), and `start` runs that command as a
`JobStep` (poll, wait, signal, kill). `megagrow run --dry-run` calls `reserve` and `command` the
same way the driver does before it starts a step, so what it prints is what runs. Adding a
launcher is one module with a class like `LocalLauncher` and one `LAUNCHERS.register` line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

from megagrow.launching.job_step import JobStep
from megagrow.errors import LaunchError
from megagrow.registry import Registry


@dataclass
class Resources:
    """What `megagrow run` knows of the machine(s) beyond the environment (flags, e.g. for a dry run)."""
    nodes: int | None = None
    nproc_per_node: int | None = None
    cpus_per_node: int | None = None
    gpus_per_node: int | None = None


class Launcher(Protocol):
    name: str

    def reserve(self, nproc: int, name: str):
        """Room for a step of `nproc` ranks (raises LaunchError when there is none); released by `release`."""

    def release(self, slot) -> None: ...

    def command(self, nproc: int, argv: list[str], name: str, slot) -> list[str]:
        """The command that runs `argv` (a script under the repository and its flags) on `nproc` ranks."""

    def start(self, nproc: int, argv: list[str], log_path: str, pid_file: str, on_line=None,
              name: str = "step") -> JobStep: ...


class LauncherBase:
    """`start` as reserve + command + JobStep, shared by the launchers."""
    name = "base"

    def reserve(self, nproc: int, name: str):
        return None

    def release(self, slot) -> None:
        pass

    def command(self, nproc: int, argv: list[str], name: str, slot) -> list[str]:
        raise NotImplementedError

    def step_name(self, name: str) -> str:
        return name

    def start(self, nproc: int, argv: list[str], log_path: str, pid_file: str, on_line=None,
              name: str = "step") -> JobStep:
        name = self.step_name(name)
        slot = self.reserve(nproc, name)
        try:
            return self.launch(self.command(nproc, argv, name, slot), log_path, pid_file, on_line, name,
                               lambda: self.release(slot))
        except BaseException:
            self.release(slot)
            raise

    def launch(self, cmd: list[str], log_path: str, pid_file: str, on_line, name: str, on_exit) -> JobStep:
        return JobStep(cmd, log_path, pid_file, on_line, on_exit=on_exit)


LAUNCHERS: Registry[Callable[[Resources], Launcher]] = Registry("launcher", LaunchError)


def make_launcher(name: str = "auto", resources: Resources | None = None) -> Launcher:
    """A launcher by name; `auto`: the first registered one that says it applies here (SLURM inside an
    allocation), else `local`."""
    resources = resources or Resources()
    if name == "auto":
        name = next((n for n, factory in LAUNCHERS.items() if getattr(factory, "applies_here", lambda: False)()),
                    "local")
    return LAUNCHERS.get(name, "--launcher: ")(resources)
