"""examples/slurm/*.sbatch parse, and render their srun lines for a fake 4-node allocation that add up."""

import glob
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "examples", "slurm", "*.sbatch")))
ALLOCATION = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu[01-04]", "SLURM_NNODES": "4",
              "SLURM_JOB_NUM_NODES": "4", "SLURM_GPUS_ON_NODE": "8", "SLURM_NTASKS_PER_NODE": "8",
              "SLURM_CPUS_ON_NODE": "96"}


def test_every_script_parses():
    assert len(SCRIPTS) >= 5
    for script in SCRIPTS + [os.path.join(ROOT, "examples", "slurm", "_driver.sh")]:
        out = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert out.returncode == 0, f"{script}: {out.stderr}"


def render(script, tmp_path, **env) -> list[str]:
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text('#!/bin/bash\necho "srun $*"\n')  # a job step's command line, not run
    (fake / "srun").chmod(0o755)
    path = f"{fake}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    from conftest import write_indexed, write_tokenizer  # the dry run checks the data it names
    write_indexed(tmp_path / "corpus")
    write_tokenizer(tmp_path / "tok.model")
    out = subprocess.run(["bash", script], cwd=tmp_path, capture_output=True, text=True,
                         env={**os.environ, **ALLOCATION, "PATH": path, "MEGAGROW_DRY_RUN": "1",
                              "RUN": str(tmp_path / "run"), "DATA": str(tmp_path / "corpus"),
                              "TOKENIZER": str(tmp_path / "tok.model"), **env})
    assert out.returncode == 0, out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if line.startswith("srun ")]


def flag(line: str, name: str, default=None) -> str | None:
    m = re.search(rf"(?:^| )--{name}[= ](\S+)", line)
    return m.group(1) if m else default


@pytest.mark.parametrize("script", [s for s in SCRIPTS if "grow_checkpoint" not in s],
                         ids=lambda s: os.path.basename(s))
def test_staged_scripts_fit_the_allocation(script, tmp_path):
    lines = render(script, tmp_path)
    assert len(lines) >= 2  # the small stage, then the target (or its probes)
    probes = []
    for cmd in lines:
        nodes, ntasks, per_node = int(flag(cmd, "nodes")), int(flag(cmd, "ntasks")), int(flag(cmd, "ntasks-per-node"))
        nodelist = set(range(int(flag(cmd, "relative")), int(flag(cmd, "relative")) + nodes))  # allocation indices
        assert ntasks == nodes * per_node and max(nodelist) < 4 and per_node <= 8, cmd
        tp, pp = int(flag(cmd, "tensor-model-parallel-size", 1)), int(flag(cmd, "pipeline-model-parallel-size", 1))
        assert ntasks % (tp * pp) == 0, cmd
        dp = ntasks // (tp * pp)
        assert int(flag(cmd, "global-batch-size")) % (int(flag(cmd, "micro-batch-size")) * dp) == 0
        assert "--exclusive" in cmd and "pretrain_gpt.py" in cmd and flag(cmd, "gpus-per-node") == str(per_node)
        heads = int(flag(cmd, "num-attention-heads"))
        assert heads % tp == 0 and int(flag(cmd, "num-layers")) % pp == 0
        if "/lag/" in flag(cmd, "save"):
            probes.append(nodelist)
    if probes:  # LAG probes two at a time, side by side on disjoint nodes
        assert len(probes) >= 2 and not probes[0] & probes[1]


def test_grow_script_is_one_job_step(tmp_path):
    script = os.path.join(ROOT, "examples", "slurm", "grow_checkpoint.sbatch")
    lines = render(script, tmp_path, SRC="src", DST="dst", TP="2", PP="2")
    assert lines[0].startswith("srun --nodes=1 --ntasks=1 megagrow checkpoint grow --load src --save dst --op stack:g=4")
    assert "--target-tp 2 --target-pp 2" in lines[0]
