"""Launchers by name. A new launcher is one module (a class like local.LocalLauncher) and one line here."""

from megagrow.launching.base import LAUNCHERS, Launcher, Resources, make_launcher  # noqa: F401
from megagrow.launching.local import LocalLauncher
from megagrow.launching.slurm import SlurmLauncher

LAUNCHERS.register("local", LocalLauncher)
LAUNCHERS.register("slurm", SlurmLauncher)
