"""Checkpoint commands under bad input and faults: one line, a non-zero exit, the source untouched, no partial left.

Each case of the table is a command as a user would type it (placeholders: {src} the source checkpoint,
{it} its iteration directory, {tmp} a scratch directory), an optional set-up that damages or arranges
files, and the fragment the one-line error must hold. Every case runs on both formats (torch_dist TP=2
with the distributed optimizer, torch PP=2 with the plain one), each on a fresh copy of a checkpoint
trained once per test run; the copy's file hashes are compared before and after.
"""

from __future__ import annotations

import fcntl
import glob
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, free_port, tiny_args, pretrain_job
from megagrow.cli import main

FORMATS = {"torch_dist": {"--tensor-model-parallel-size": "2", "--use-distributed-optimizer": ""},
           "torch": {"--pipeline-model-parallel-size": "2", "--ckpt-format": "torch"}}


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """One tiny checkpoint per format at iteration 2, written by pretrain_gpt.py."""
    d = tmp_path_factory.mktemp("trained")
    for fmt, flags in FORMATS.items():
        run = pretrain_job(2, tiny_args(data_dir, **flags, **{"--train-iters": "2", "--save": str(d / fmt)}),
                       d / f"{fmt}.jsonl")
        assert run.returncode == 0, run.output
    return d


def tree(path) -> dict[str, str]:
    """Every file under `path` (links as their target) -> a hash of its bytes."""
    out = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            p = os.path.join(root, name)
            rel = os.path.relpath(p, path)
            if os.path.islink(p):
                out[rel] = "link:" + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = hashlib.sha1(open(p, "rb").read()).hexdigest()
    return out


def cli(capsys, argv):
    capsys.readouterr()
    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def leftovers(tmp) -> list[str]:
    return [p for p in glob.glob(f"{tmp}/**/*", recursive=True) if p.endswith((".partial", ".old", ".lock"))]


def shard(it):
    """One tensor shard file of the iteration directory (a .distcp, or a rank's .pt)."""
    return sorted(glob.glob(f"{it}/*.distcp") or glob.glob(f"{it}/mp_rank_*/model_optim_rng.pt"))[0]


def truncate(path, keep=0.5):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep))


def garbage(path):
    with open(path, "wb") as f:
        f.write(os.urandom(256))


def common_file(it):
    return os.path.join(it, "common.pt") if os.path.exists(os.path.join(it, "common.pt")) else shard(it)


SETUPS = {
    "file_at_save": lambda src, it, tmp: open(f"{tmp}/file", "w").write("x"),
    "full_save": lambda src, it, tmp: (os.makedirs(f"{tmp}/full"), open(f"{tmp}/full/keep.txt", "w").write("x")),
    "empty_load": lambda src, it, tmp: os.makedirs(f"{tmp}/empty"),
    "file_load": lambda src, it, tmp: open(f"{tmp}/notes.txt", "w").write("not a checkpoint"),
    "binary_tracker": lambda src, it, tmp: open(f"{src}/latest_checkpointed_iteration.txt", "wb").write(b"\x00\xff\x13"),
    "text_tracker": lambda src, it, tmp: open(f"{src}/latest_checkpointed_iteration.txt", "w").write("latest"),
    "missing_iteration": lambda src, it, tmp: open(f"{src}/latest_checkpointed_iteration.txt", "w").write("7"),
    "link_to_src": lambda src, it, tmp: os.symlink(src, f"{tmp}/link"),
    "link_to_parent": lambda src, it, tmp: os.symlink(os.path.dirname(src), f"{tmp}/plink"),
    "truncated_shard": lambda src, it, tmp: truncate(shard(it)),
    "empty_shard": lambda src, it, tmp: truncate(shard(it), 0),
    "garbage_shard": lambda src, it, tmp: garbage(shard(it)),
    "empty_common": lambda src, it, tmp: truncate(common_file(it), 0),
    "garbage_common": lambda src, it, tmp: garbage(common_file(it)),
    "no_shard": lambda src, it, tmp: os.remove(shard(it)),
    "no_metadata": lambda src, it, tmp: [os.remove(p) for p in glob.glob(f"{it}/.metadata")] or
    shutil.rmtree(sorted(glob.glob(f"{it}/mp_rank_*"))[-1], ignore_errors=True),
}

CONVERT, GROW, INSPECT = ["checkpoint", "convert", "--quiet"], ["checkpoint", "grow", "--quiet"], \
    ["checkpoint", "inspect"]
STACK = ["--op", "stack:g=2"]

# (id, argv, set-up, fragment of the one-line error)
CASES = [
    # paths
    ("load_missing", CONVERT + ["--load", "{tmp}/nope", "--save", "{tmp}/out"], None, "no such directory"),
    ("load_file", CONVERT + ["--load", "{tmp}/notes.txt", "--save", "{tmp}/out"], "file_load", "no such directory"),
    ("load_empty", CONVERT + ["--load", "{tmp}/empty", "--save", "{tmp}/out"], "empty_load", "not a checkpoint"),
    ("save_empty_string", CONVERT + ["--load", "{src}", "--save", ""], None, "--save is empty"),
    ("save_blank", GROW + STACK + ["--load", "{src}", "--save", " "], None, "--save is empty"),
    ("save_is_load", CONVERT + ["--load", "{src}", "--save", "{src}", "--force"], None, "is the source"),
    ("save_is_load_slash", CONVERT + ["--load", "{src}", "--save", "{src}/", "--force"], None, "is the source"),
    ("save_is_load_dotdot", CONVERT + ["--load", "{src}", "--save", "{src}/../src", "--force"], None,
     "is the source"),
    ("save_inside_load", CONVERT + ["--load", "{src}", "--save", "{src}/converted"], None, "inside the source"),
    ("save_inside_iteration", CONVERT + ["--load", "{src}", "--save", "{it}/converted"], None, "inside the source"),
    ("save_is_iteration", CONVERT + ["--load", "{it}", "--save", "{it}", "--force"], None, "is the source"),
    ("save_root_of_iteration", CONVERT + ["--load", "{it}", "--save", "{src}", "--force"], None, "the source"),
    ("save_parent_force", CONVERT + ["--load", "{src}", "--save", "{tmp}", "--force"], None, "contains the source"),
    ("grow_save_parent_force", GROW + STACK + ["--load", "{src}", "--save", "{tmp}", "--force"], None,
     "contains the source"),
    ("grow_save_inside", GROW + STACK + ["--load", "{src}", "--save", "{src}/grown"], None, "inside the source"),
    ("save_link_to_source", CONVERT + ["--load", "{src}", "--save", "{tmp}/link", "--force"], "link_to_src",
     "is the source"),
    ("grow_save_link_to_source", GROW + STACK + ["--load", "{src}", "--save", "{tmp}/link", "--force"], "link_to_src",
     "is the source"),
    ("save_link_to_parent", CONVERT + ["--load", "{src}", "--save", "{tmp}/plink", "--force"], "link_to_parent",
     "contains the source"),
    ("load_via_link_save_real", CONVERT + ["--load", "{tmp}/link", "--save", "{src}", "--force"], "link_to_src",
     "is the source"),
    ("save_is_file", CONVERT + ["--load", "{src}", "--save", "{tmp}/file"], "file_at_save", "not a directory"),
    ("save_is_file_force", GROW + STACK + ["--load", "{src}", "--save", "{tmp}/file", "--force"], "file_at_save",
     "not a directory"),
    ("save_under_file", CONVERT + ["--load", "{src}", "--save", "{tmp}/file/out"], "file_at_save", "not a directory"),
    ("save_not_empty", CONVERT + ["--load", "{src}", "--save", "{tmp}/full"], "full_save", "not empty"),
    ("grow_save_not_empty", GROW + STACK + ["--load", "{src}", "--save", "{tmp}/full"], "full_save", "not empty"),
    # bad files
    ("binary_tracker", CONVERT + ["--load", "{src}", "--save", "{tmp}/out"], "binary_tracker", "binary content"),
    ("text_tracker", GROW + STACK + ["--load", "{src}", "--save", "{tmp}/out"], "text_tracker",
     "expected an iteration number"),
    ("tracker_names_missing", CONVERT + ["--load", "{src}", "--save", "{tmp}/out"], "missing_iteration",
     "which does not exist"),
    ("truncated_shard", CONVERT + ["--load", "{src}", "--save", "{tmp}/out"], "truncated_shard", "{src}"),
    ("grow_truncated_shard", GROW + STACK + ["--load", "{src}", "--save", "{tmp}/out"], "truncated_shard", "{src}"),
    ("empty_shard", CONVERT + ["--load", "{src}", "--save", "{tmp}/out", "--target-tp", "1"], "empty_shard",
     "{src}"),
    ("garbage_shard", CONVERT + ["--load", "{src}", "--save", "{tmp}/out", "--target-pp", "1"], "garbage_shard",
     "{src}"),
    ("empty_common", CONVERT + ["--load", "{src}", "--save", "{tmp}/out"], "empty_common", "{src}"),
    ("garbage_common", GROW + STACK + ["--load", "{src}", "--save", "{tmp}/out"], "garbage_common", "{src}"),
    ("missing_shard", CONVERT + ["--load", "{src}", "--save", "{tmp}/out"], "no_shard", "{src}"),
    ("missing_metadata", CONVERT + ["--load", "{src}", "--save", "{tmp}/out"], "no_metadata", "{src}"),
    ("inspect_missing", INSPECT + ["{tmp}/nope"], None, "no such directory"),
    ("inspect_binary_tracker", INSPECT + ["{src}"], "binary_tracker", "binary content"),
    ("inspect_garbage_common", INSPECT + ["{src}"], "garbage_common", "{src}"),
    # bad sizes and specs
    ("target_tp_zero", CONVERT + ["--load", "{src}", "--save", "{tmp}/out", "--target-tp", "0"], None,
     "--target-tp must be at least 1"),
    ("target_tp_3", CONVERT + ["--load", "{src}", "--save", "{tmp}/out", "--target-tp", "3"], None,
     "not divisible by tensor parallel size 3"),
    ("target_pp_too_many", CONVERT + ["--load", "{src}", "--save", "{tmp}/out", "--target-pp", "5"], None,
     "do not split into 5"),
    ("target_pp_uneven", GROW + STACK + ["--load", "{src}", "--save", "{tmp}/out", "--target-pp", "3"], None,
     "do not split into 3"),
    ("bad_format", CONVERT + ["--load", "{src}", "--save", "{tmp}/out", "--ckpt-format", "zarr"], None, "zarr"),
    ("unknown_op", GROW + ["--op", "nope", "--load", "{src}", "--save", "{tmp}/out"], None, "nope"),
    ("misspelt_op", GROW + ["--op", "stak:g=4", "--load", "{src}", "--save", "{tmp}/out"], None, "stak"),
    ("stack_g0", GROW + ["--op", "stack:g=0", "--load", "{src}", "--save", "{tmp}/out"], None, "g=0"),
    ("stack_wrong_layers", GROW + STACK + ["--num-layers", "5", "--load", "{src}", "--save", "{tmp}/out"], None,
     "5"),
    ("width_not_divisible_by_heads", GROW + ["--op", "direct", "--hidden-size", "66", "--load", "{src}",
                                             "--save", "{tmp}/out"], None, "--hidden-size 66 is not divisible"),
    ("width_heads_vs_tp", GROW + ["--op", "direct", "--hidden-size", "96", "--num-attention-heads", "6",
                                  "--num-query-groups", "3", "--target-tp", "2", "--load", "{src}",
                                  "--save", "{tmp}/out"], None, "not divisible by tensor parallel size 2"),
    ("width_groups_vs_heads", GROW + ["--op", "direct", "--hidden-size", "128", "--num-attention-heads", "8",
                                      "--num-query-groups", "3", "--load", "{src}", "--save", "{tmp}/out"], None,
     "--num-query-groups 3"),
    ("width_negative", GROW + ["--op", "direct", "--hidden-size", "-64", "--load", "{src}", "--save", "{tmp}/out"],
     None, "-64"),
    ("width_shrink", GROW + ["--op", "direct", "--hidden-size", "32", "--load", "{src}", "--save", "{tmp}/out"],
     None, "32"),
    ("depth_zero_layers", GROW + ["--op", "zero", "--num-layers", "0", "--load", "{src}", "--save", "{tmp}/out"],
     None, "0"),
]


def _fill(argv, src, it, tmp):
    return [a.format(src=src, it=it, tmp=tmp) for a in argv]


def _copy_source(trained, fmt, tmp):
    src = tmp / "src"
    shutil.copytree(trained / fmt, src, symlinks=True)
    it = glob.glob(f"{src}/iter_*")[0]
    return str(src), it


def check_one_line_failure(code, err, fragment):
    lines = err.strip().splitlines()
    assert code == 1, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert fragment in lines[0], (fragment, lines[0])


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(trained, tmp_path, capsys, fmt, case):
    _, argv, setup, fragment = case
    src, it = _copy_source(trained, fmt, tmp_path)
    if setup:
        SETUPS[setup](src, it, str(tmp_path))
    before, around = tree(src), set(os.listdir(tmp_path))
    code, _, err = cli(capsys, _fill(argv, src, it, tmp_path))
    check_one_line_failure(code, err, fragment.format(src=src))
    assert tree(src) == before, "the source changed"
    assert set(os.listdir(tmp_path)) == around, "something was left next to the source"
    assert not leftovers(tmp_path)


# -- faults: the filesystem, concurrent writers, kills ----------------------------------------------------------

def _mount_tmpfs(path, size, *options):
    os.makedirs(path, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join([f"size={size}", *options]), "tmpfs", str(path)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    return path


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(name, size="64m", *options):
        mounted.append(_mount_tmpfs(tmp_path / name, size, *options))
        return mounted[-1]
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.mark.parametrize("fmt,command", [
    ("torch_dist", CONVERT + ["--target-tp", "1", "--target-pp", "1"]),  # streamed: every tensor re-split
    ("torch_dist", CONVERT),  # the default chunk copy (copy_file_range, which refuses another filesystem)
    ("torch_dist", GROW + STACK),  # the chunk copy under new layer indices
    ("torch", CONVERT), ("torch", GROW + STACK)], ids=["convert_streamed", "convert_chunks", "grow_chunks",
                                                       "convert_torch", "grow_torch"])
def test_another_filesystem_is_byte_identical(trained, tmp_path, tmpfs, fmt, command):
    """Each output written by its own process, as a user runs them (within one process, pickle's memo
    depends on which equal strings happen to be one object, and the bytes of a .pt with it)."""
    src, it = _copy_source(trained, fmt, tmp_path)
    other = tmpfs("scratch")
    before = tree(src)
    for save in (tmp_path / "same", other / "out"):
        out = subprocess.run([sys.executable, "-m", "megagrow.cli", *command, "--load", src, "--save", str(save)],
                             cwd=ROOT, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
    assert tree(tmp_path / "same") == tree(other / "out")
    assert tree(src) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("command", [CONVERT, GROW + STACK], ids=["convert", "grow"])
def test_full_disk(trained, tmp_path, tmpfs, capsys, fmt, command):
    """Too small to start (the size is known): refused before writing; big enough to start, too small to finish:
    the write's ENOSPC is one line; a replaced target survives either; the same command then works elsewhere."""
    src, it = _copy_source(trained, fmt, tmp_path)
    before = tree(src)
    source_bytes = sum(os.path.getsize(p) for p in glob.glob(f"{it}/**", recursive=True) if os.path.isfile(p))
    for size in ("64k", str(source_bytes // 2)):
        disk = tmpfs(f"disk{size}", size)
        code, _, err = cli(capsys, command + ["--load", src, "--save", str(disk / "out")])
        check_one_line_failure(code, err, "no space left on")
        assert str(disk) in err and os.listdir(disk) == [], os.listdir(disk)
    code, _, err = cli(capsys, command + ["--load", src, "--save", str(tmp_path / "roomy")])
    assert code == 0, err
    assert tree(src) == before and not leftovers(tmp_path)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_full_disk_keeps_the_replaced_target(trained, tmp_path, tmpfs, capsys, fmt):
    src, it = _copy_source(trained, fmt, tmp_path)
    disk = tmpfs("disk", "16m")
    code, _, err = cli(capsys, CONVERT + ["--load", src, "--save", str(disk / "out")])
    assert code == 0, err
    kept = tree(disk / "out")
    filler = disk / "filler"
    with open(filler, "wb") as f:  # leave less room than a second copy needs
        free = shutil.disk_usage(disk).free
        f.write(b"\0" * max(free - 64 * 1024, 0))
    code, _, err = cli(capsys, GROW + STACK + ["--load", src, "--save", str(disk / "out"), "--force"])
    check_one_line_failure(code, err, "no space left on")
    assert tree(disk / "out") == kept and sorted(os.listdir(disk)) == ["filler", "out"]


@pytest.mark.parametrize("command", [CONVERT, GROW + STACK], ids=["convert", "grow"])
def test_read_only_target(trained, tmp_path, tmpfs, capsys, command):
    src, it = _copy_source(trained, "torch_dist", tmp_path)
    ro = tmpfs("ro", "16m", "ro")
    code, _, err = cli(capsys, command + ["--load", src, "--save", str(ro / "out")])
    check_one_line_failure(code, err, "read-only file system")


def test_permission_denied(trained, tmp_path):
    """Without the right to override file permissions (root's is dropped): a target parent the command may not
    write to is one line from the real command, and nothing is left there."""
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to drop the permission override")
    src, it = _copy_source(trained, "torch_dist", tmp_path)
    locked = tmp_path / "locked"
    os.makedirs(locked)
    os.chmod(locked, 0o555)
    for command in (CONVERT, GROW + STACK):
        out = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", sys.executable,
                              "-m", "megagrow.cli", *command, "--load", src, "--save", str(locked / "out")],
                             cwd=ROOT, capture_output=True, text=True)
        check_one_line_failure(out.returncode, out.stderr, "permission denied")
    assert os.listdir(locked) == []


def test_concurrent_writer_is_refused(trained, tmp_path, capsys):
    src, it = _copy_source(trained, "torch_dist", tmp_path)
    save = tmp_path / "out"
    with open(f"{save}.lock", "w") as held:  # another command writing the same target right now
        fcntl.flock(held, fcntl.LOCK_EX)
        for command in (CONVERT, GROW + STACK):
            code, _, err = cli(capsys, command + ["--load", src, "--save", str(save)])
            check_one_line_failure(code, err, "another command is writing it")
        assert not save.exists()
    code, _, err = cli(capsys, CONVERT + ["--load", src, "--save", str(save)])  # the lock is gone with its holder
    assert code == 0, err
    assert not leftovers(tmp_path)


def test_two_real_writers_at_once(trained, tmp_path):
    """Two processes converting into one target: one checkpoint lands whole, never two interleaved."""
    src, it = _copy_source(trained, "torch_dist", tmp_path)
    cmd = [sys.executable, "-m", "megagrow.cli", *CONVERT, "--load", src, "--save", str(tmp_path / "out"),
           "--target-tp", "1", "--target-pp", "1"]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) in ([0, 0], [0, 1]), results
    for code, err in results:
        if code:
            assert err.strip().splitlines()[-1].startswith("error: --save"), err
    code = main(INSPECT + [str(tmp_path / "out")])
    assert code == 0 and not leftovers(tmp_path)


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("command", [CONVERT + ["--target-tp", "1", "--target-pp", "1"], GROW + STACK],
                         ids=["convert", "grow"])
def test_sigkill_mid_write_then_rerun(trained, tmp_path, capsys, fmt, command):
    src, it = _copy_source(trained, fmt, tmp_path)
    before, save = tree(src), tmp_path / "out"
    argv = [*command, "--load", src, "--save", str(save)]
    proc = subprocess.Popen([sys.executable, "-m", "megagrow.cli", *argv], cwd=ROOT, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(f"{save}.partial") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not save.exists() or main(INSPECT + [str(save)]) == 0  # nothing, or (too late to kill) a whole one
    code, _, err = cli(capsys, argv + ["--force"])
    assert code == 0, err
    assert main(INSPECT + [str(save)]) == 0
    assert tree(src) == before and not leftovers(tmp_path)


def test_killed_between_the_two_renames_recovers(trained, tmp_path, capsys):
    """A writer killed after moving the old target aside: the rerun without --force still refuses (the old
    target counts), and with --force replaces it; a rerun never loses the old target to a failure."""
    src, it = _copy_source(trained, "torch_dist", tmp_path)
    save = tmp_path / "out"
    assert main(CONVERT + ["--load", src, "--save", str(save)]) == 0
    os.replace(save, f"{save}.old")
    code, _, err = cli(capsys, CONVERT + ["--load", src, "--save", str(save)])
    check_one_line_failure(code, err, "not empty")
    assert main(CONVERT + ["--load", src, "--save", str(save), "--force"]) == 0
    assert not leftovers(tmp_path) and main(INSPECT + [str(save)]) == 0


def test_unexpected_error_is_one_line_and_a_log(tmp_path):
    """A bug (here: a module that fails to import) is one line that points to the traceback's log file."""
    (tmp_path / "megagrow_boom.py").write_text("raise RuntimeError('boom')\n")
    code = ("import sys; from megagrow.entry import guarded\n"
            "def main():\n    import megagrow_boom\n"
            "sys.exit(guarded(main))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "TMPDIR": str(tmp_path)})
    check_one_line_failure(out.returncode, out.stderr, "unexpected RuntimeError: boom (traceback in ")
    log = out.stderr.split("traceback in ")[1].split(";")[0]
    assert "raise RuntimeError('boom')" in open(log).read()
    debug = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": f"{tmp_path}:{ROOT}", "MEGAGROW_DEBUG": "1"})
    assert debug.returncode == 1 and "Traceback" in debug.stderr


def test_sigkill_during_training_saves_then_rerun(data_dir, tmp_path):
    """Kill the whole job (launcher and ranks) while it saves every iteration; the same command resumes from
    the newest whole checkpoint and finishes, leaving no temporary iteration directory."""
    save = tmp_path / "ckpt"
    argv = tiny_args(data_dir, **{"--train-iters": "8", "--save": str(save), "--load": str(save),
                                  "--save-interval": "1", "--tensor-model-parallel-size": "2"})
    def cmd():
        return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                str(free_port()), "pretrain_gpt.py", *argv]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    deadline = time.time() + 240
    while not glob.glob(f"{save}/iter_000000[2-9].tmp") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    from megagrow.checkpoint.errors import read_tracker
    killed_at = read_tracker(str(save))
    assert killed_at is not None and killed_at < 8, killed_at
    assert main(INSPECT + [str(save)]) == 0  # the tracker names a whole checkpoint
    rerun = subprocess.run(cmd(), cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert read_tracker(str(save)) == 8
    assert not [p for p in os.listdir(save) if p.endswith((".tmp", ".old"))], os.listdir(save)
