"""A process that has imported torch, megatron-core and megagrow's trainer once, and forks the ranks of a
script (pretrain_gpt.py, tests/logits_worker.py) or module (megagrow.cli) on request, so that a test's multi-process run starts in a
fraction of a second instead of spending most of its time in `torchrun` and in N fresh interpreters importing
the same libraries.

The ranks are ordinary processes joined by gloo, each running the script as `__main__` with the environment
torchrun gives its workers (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, ...). As torchrun does, the first
rank to fail stops the others. Tests of torchrun itself (signals, the launcher's exit) use the real one.

    python tests/rank_server.py ADDRESS      # serves requests on a Unix socket until its client goes away
"""

from __future__ import annotations

import os
import signal
import sys
import time
from multiprocessing.connection import Listener

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rank(rank: int, request: dict, out_fd: int, err_fd: int) -> None:
    """In the forked child: become rank `rank` of the job and never return."""
    code = 70
    try:
        os.setpgid(0, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        nproc = request["nproc"]
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc),
                           "LOCAL_WORLD_SIZE": str(nproc), "GROUP_RANK": "0", "ROLE_RANK": str(rank),
                           "ROLE_WORLD_SIZE": str(nproc), "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(request["port"]), "OMP_NUM_THREADS": "1"})
        os.chdir(request["cwd"])
        import runpy
        import torch
        torch.set_num_threads(1)
        if "module" in request:  # python -m MODULE
            sys.argv = [request["module"], *request["argv"]]
            sys.path[0] = request["cwd"]
            runpy.run_module(request["module"], run_name="__main__", alter_sys=True)
        else:
            script = os.path.join(request["cwd"], request["script"])
            sys.argv = [script, *request["argv"]]
            sys.path[0] = os.path.dirname(script)
            runpy.run_path(script, run_name="__main__")
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:  # noqa: BLE001  (the traceback belongs in the run's output, as torchrun shows it)
        import traceback
        traceback.print_exc()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # noqa: BLE001
                pass
        os._exit(code or 0)


def _signal_all(pids: list[int], exited: dict, sig: int) -> None:
    for pid in pids:
        if pid not in exited:
            try:
                os.killpg(pid, sig)
            except ProcessLookupError:
                pass


def _run(request: dict) -> dict:
    """Fork the job's ranks, wait for them (stopping all when one fails, as torchrun does) -> exit codes."""
    out_fd, err_fd = (os.open(request[k], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644) for k in ("log", "err"))
    pids = []
    for rank in range(request["nproc"]):
        pid = os.fork()
        if pid == 0:
            _rank(rank, request, out_fd, err_fd)
        try:
            os.setpgid(pid, pid)  # as the child does: each rank leads its group, whichever runs first
        except (PermissionError, ProcessLookupError):
            pass
        pids.append(pid)
    os.close(out_fd)
    os.close(err_fd)
    codes: dict[int, int] = {}
    deadline = time.monotonic() + request["timeout"]
    kill_at = deadline  # after a failure: SIGTERM to the rest, SIGKILL 30 s later (torchrun's grace period)
    terminated = timed_out = False
    while len(codes) < len(pids):
        for pid in pids:
            if pid not in codes and (done := os.waitpid(pid, os.WNOHANG))[0]:
                codes[pid] = os.waitstatus_to_exitcode(done[1])
        now = time.monotonic()
        if any(code != 0 for code in codes.values()) and not terminated:
            terminated, kill_at = True, min(deadline, now + 30)
            _signal_all(pids, codes, signal.SIGTERM)
        if now > kill_at:
            timed_out = now > deadline
            _signal_all(pids, codes, signal.SIGKILL)
        time.sleep(0.01)
    return {"codes": [codes[pid] for pid in pids], "timed_out": timed_out}


def serve(address: str) -> None:
    import megagrow  # noqa: F401  (before megatron-core: its compiled kernels compile at first call)
    import megagrow.training.launch  # noqa: F401
    import megagrow.training.pretrain  # noqa: F401  (torch, megatron-core, the trainer: what each rank needs)
    import megagrow.checkpoint.trainer  # noqa: F401
    import megagrow.model.growth_masks  # noqa: F401  (and what tests/logits_worker.py adds)
    import megagrow.checkpoint.io  # noqa: F401  (what `megagrow checkpoint ...` reads and writes with; megagrow.cli
    # itself is left to runpy, which runs it as __main__)
    with Listener(address, family="AF_UNIX") as listener, listener.accept() as conn:
        conn.send("ready")
        while True:
            try:
                request = conn.recv()
            except EOFError:
                return
            conn.send(_run(request))


if __name__ == "__main__":
    sys.path.insert(0, ROOT)
    serve(sys.argv[1])
