"""The shape of the code: no import cycle inside megagrow/ (lazy imports inside functions count too),
and a launcher is one class plus one registration (a toy one registered here)."""

import ast
import os
import sys

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "megagrow")


def module_name(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
    return rel[:-len(".__init__")] if rel.endswith(".__init__") else rel


def import_graph() -> dict[str, set[str]]:
    files = {module_name(os.path.join(d, f)): os.path.join(d, f)
             for d, _, names in os.walk(PACKAGE) for f in names if f.endswith(".py")}
    graph = {}
    for name, path in files.items():
        edges = set()
        for node in ast.walk(ast.parse(open(path).read(), path)):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            edges |= {t for t in targets if t in files and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))
    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_megagrow():
    graph = import_graph()
    assert len(graph) > 40 and graph["megagrow.scheduling.driver"]  # the graph was really read
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_a_launcher_is_one_class_and_one_registration(tmp_path, capsys):
    """A toy launcher registered here renders the dry run's lines and really starts its job steps."""
    from megagrow.launching import LAUNCHERS
    from megagrow.launching.base import LauncherBase
    from megagrow.scheduling.plan import Plan, Stage, dump_plan
    from megagrow.cli import main

    class Echo(LauncherBase):
        name = "echo"

        def __init__(self, resources):
            pass

        def command(self, nproc, argv, name, slot):
            return [sys.executable, "-c", "import sys; print('ranks', sys.argv[1])", str(nproc), *argv]

    LAUNCHERS.register("echo", Echo)
    try:
        target = {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4}
        stages = [Stage("2l", model={"num_layers": 2}, stop={"policy": "iters", "iteration": 4}, parallel={"nproc": 2}),
                  Stage("4l", grow={"op": "stack:g=2"}, stop={"policy": "flops"}, parallel={"nproc": 1})]
        from conftest import write_indexed
        write_indexed(tmp_path / "corpus")
        plan = Plan(target, {}, {"global_batch_size": 8, "micro_batch_size": 2, "seq_length": 32, "lr": 1e-3},
                    {"data_path": str(tmp_path / "corpus"), "tokenizer_type": "NullTokenizer", "vocab_size": 512},
                    stages, vocab_size=512)
        plan.budget = {"flops": 4 * plan.step_flops(stages[0]) + 4 * plan.step_flops()}
        path = tmp_path / "plan.yaml"
        path.write_text(dump_plan(plan))
        assert main(["run", str(path), "--launcher", "echo", "--dry-run", "--output", str(tmp_path / "run")]) == 0
        lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(sys.executable)]
        assert len(lines) == 2 and " 2 pretrain_gpt.py " in lines[0] and " 1 pretrain_gpt.py " in lines[1]
        assert not (tmp_path / "run").exists()
        step = LAUNCHERS.get("echo")(None).start(3, ["pretrain_gpt.py", "--x"], str(tmp_path / "log.txt"),
                                                 str(tmp_path / "pgid"))
        assert step.wait() == 0
        assert (tmp_path / "log.txt").read_text().splitlines()[1] == "ranks 3"
    finally:
        LAUNCHERS.unregister("echo")
