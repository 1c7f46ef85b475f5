"""The error every megagrow command prints as one line (`error: ...`, exit code 1), never a traceback."""


class MegagrowError(ValueError):
    """Bad input or a state that cannot work, said in one line that names the problem."""


class LaunchError(MegagrowError):
    """A job step that cannot be launched as asked (no room in the allocation, no allocation)."""
