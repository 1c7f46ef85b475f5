"""The top-level handler of every entry point (`megagrow`, `pretrain_gpt.py`, `tools/*.py`).

A known error (MegagrowError, or an OS error such as no space left / permission denied / read-only,
which names its path) is one line `error: ...` and exit code 1. Anything else is a bug or an
unforeseen fault: one line naming it and the log file that holds the full traceback
(`MEGAGROW_DEBUG=1` prints the traceback instead). Under torchrun only rank 0 prints a known error,
so a mistake every rank sees is said once rather than as a wall of identical lines (the other ranks wait
for the launcher to stop them once rank 0 has exited).
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import tempfile
import time
import traceback
from typing import Callable

from megagrow.errors import MegagrowError

# OS errors that are the machine's state, not a bug: said in one line with the path they hit.
KNOWN_OS_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                   errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
                   errno.EROFS: "read-only file system", errno.ENOENT: "no such file or directory",
                   errno.ENOTDIR: "not a directory", errno.EISDIR: "is a directory",
                   errno.EEXIST: "already exists", errno.ENAMETOOLONG: "file name too long"}


def os_error_line(e: OSError, doing: str = "") -> str | None:
    """`OSError` -> 'no space left on device: PATH (while ...)', or None if it is not a known kind."""
    what = KNOWN_OS_ERRORS.get(e.errno)
    if what is None:
        return None
    where = f": {e.filename}" if e.filename else ""
    return f"{what}{where}" + (f" ({doing})" if doing else "")


def _rank() -> int:
    return int(os.environ.get("RANK", "0") or 0)


def _say(line: str) -> None:
    print(f"error: {line}", file=sys.stderr, flush=True)


def report_unexpected(e: BaseException) -> str:
    """Write the traceback to a log file and return the one line that points to it."""
    text = "".join(traceback.format_exception(e))
    if os.environ.get("MEGAGROW_DEBUG") == "1":
        sys.stderr.write(text)
        return f"unexpected {type(e).__name__}: {e}"
    fd, path = tempfile.mkstemp(prefix=f"megagrow-error-rank{_rank()}-", suffix=".log")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    first = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"unexpected {type(e).__name__}{': ' + first if first else ''} (traceback in {path}; " \
           f"MEGAGROW_DEBUG=1 prints it)"


def _wait_for_rank_zero(seconds: float = 5.0) -> None:
    """Leave the line to rank 0: the launcher stops this rank once rank 0 has exited with it. A rank exiting
    first would have the launcher stop rank 0 before it printed. Still here after `seconds`: say it too."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the trainer's requeue handler must not outlive the run
    time.sleep(seconds)


def guarded(main: Callable[[], int | None], all_ranks_agree: bool = True) -> int:
    """Run `main` and turn whatever escapes it into an exit code and at most one line per process.

    all_ranks_agree: a known error is one every rank raised the same way (inputs are checked on every
    rank), so only rank 0 says it; unexpected errors are said by the rank that met them.
    """
    try:
        code = main()
        return 0 if code is None else int(code)
    except MegagrowError as e:
        if all_ranks_agree and _rank() != 0 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            _wait_for_rank_zero()
        _say(str(e))
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr, flush=True)
        return 130
    except SystemExit as e:
        if isinstance(e.code, str):
            _say(e.code)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BrokenPipeError:
        # The reader went away (`megagrow checkpoint inspect X | head`): stop quietly, as POSIX tools do.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing left to flush at exit
        except (OSError, ValueError):
            pass
        return 128 + signal.SIGPIPE
    except OSError as e:
        line = os_error_line(e)
        _say(line if line else report_unexpected(e))
        return 1
    except Exception as e:  # noqa: BLE001 - the last line of defence: one line and a log, not a traceback
        _say(report_unexpected(e))
        return 1
