"""A plan's stages checked as their own processes would check them, before stage 0 starts.

The schema (scheduling.schema) checks the plan's text; this checks what needs the machine: that the
data and tokenizer files exist where the stages run (the repository root, a job step's working
directory), that every stage's command line passes the trainer's own validation (its argv rendered
by the driver and parsed and validated in-process by training.arguments, with the stage's process
count as the world size), and that the launcher has room for each step. `megagrow run` and
`--dry-run` both call it (Driver.prepare) before anything is written, so a plan that would fail in
stage 3 fails here, in one line naming the stage and the key:

    stages[1].parallel.nproc: --global-batch-size 8 is not divisible by --micro-batch-size 2 x ...
"""

from __future__ import annotations

import os
import re

from megagrow.errors import MegagrowError
from megagrow.launching.job_step import ROOT
from megagrow.scheduling.timing import PlanError

_FLAG = re.compile(r"--([a-z][a-z0-9-]*)")


def _resolve(path: str) -> str:
    """A path as the stage's processes see it: they run in the repository root, and no shell expands `~`."""
    return os.path.join(ROOT, path)


def _where(path: str) -> str:
    return "" if os.path.isabs(path) else f" (relative to {ROOT}, where the stages run)"


def _setting(plan, key: str) -> tuple[str, object]:
    """The key path and value of a run-wide setting (data, else training) as the trainer receives it."""
    for name, values in (("data", plan.data), ("training", plan.training)):
        if values.get(key) is not None:
            return f"{name}.{key}", values[key]
    return f"data.{key}", None


DATA_PATHS = ("train_data_path", "valid_data_path", "test_data_path")  # the trainer's other blends
# The tokenizer flags that name files, resolved as the stages see them (as the data paths are).
TOKENIZER_PATHS = ("tokenizer_model", "vocab_file", "merge_file")


def _prefixes(paths: list[str]) -> list[str]:
    """The prefixes of Megatron-LM's --data-path (a blend that is not well formed has none here: the
    trainer's own check says what is wrong with it)."""
    from megagrow.data.indexed import blend
    parsed = blend(paths)
    return parsed[1] if parsed else []


def check_data(plan) -> None:
    """Every data path prefix has its .bin and .idx; the files the tokenizer type reads exist (or a vocab size is
    given). What is inside them the trainer's validation reads (check_stage): megagrow.data.tokenizer says which
    files each --tokenizer-type needs, and builds it there."""
    from megagrow.data.tokenizer import FILE_FLAGS, TOKENIZER_FILES, default_tokenizer_type
    keys = [key for key in ("data_path", *DATA_PATHS) if _setting(plan, key)[1]]
    if not keys and not _setting(plan, "mock_data")[1]:
        raise PlanError(f"{_setting(plan, 'data_path')[0]}: missing (the trainer needs --data-path: a prefix, or "
                        "weight prefix weight prefix ...)")
    for data_key in keys:
        key, value = _setting(plan, data_key)
        for prefix in _prefixes([value] if isinstance(value, str) else [str(v) for v in value]):
            missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(_resolve(prefix) + ext)]
            if missing:
                raise PlanError(f"{key}: {prefix}: {' and '.join(missing)} not found{_where(prefix)} (a prefix names "
                                "an indexed dataset's .bin and .idx)")
    type_key, kind = _setting(plan, "tokenizer_type")
    kind = default_tokenizer_type(kind, *(_setting(plan, k)[1] for k in ("tokenizer_model", "vocab_file", "merge_file")))
    if kind == "NullTokenizer" and _setting(plan, "vocab_size")[1] is None:
        raise PlanError(f"{_setting(plan, 'vocab_size')[0]}: missing (NullTokenizer needs --vocab-size)")
    for dest in TOKENIZER_FILES.get(kind, ()):  # an unknown type is the schema's to refuse
        key, path = _setting(plan, dest)
        if not path:
            raise PlanError(f"{key}: missing ({type_key} {kind} needs {FILE_FLAGS[dest][0]})")
        if not os.path.exists(_resolve(path)):
            raise PlanError(f"{key}: {path} not found{_where(path)}")


def _key_for(message: str, sources: dict[str, str], stage_path: str, files: dict[str, str]) -> str:
    """The key path a trainer message is about: the most specific place that sets a flag it names (the
    stage's process count for its world size; the data or tokenizer key for a message about their files)."""
    found = []
    if "world size" in message or "data-parallel size" in message:
        found.append((-1, f"{sources['parallel']}.nproc"))
    found += [(6, key) for path, key in files.items() if path in message]
    found += [(_rank(sources[key]), sources[key]) for key in (f.replace("-", "_") for f in _FLAG.findall(message))
              if key in sources]
    return min(found)[1] if found else stage_path


def _rank(path: str) -> int:
    """Most specific first: the key a message names when it mentions several flags."""
    if path.startswith("stages["):
        return 0 if ".parallel." in path else 1
    return {"training": 2, "data": 3, "target": 4}.get(path.split(".")[0], 5)


def _trainer_args(argv: list[str], path: str):
    """The trainer's parser on `argv` (a stage's flags), its mistakes raised rather than printed."""
    from megagrow.training.arguments import build_parser
    parser = build_parser()

    def error(message: str):
        raise PlanError(f"{path}: the trainer refuses the stage's flags: {message}")
    parser.error = error
    return parser.parse_args(argv)


def check_stage(driver, stage, where, start: int, rule, path: str, parallel_path: str, decay_iters=None,
                eval_interval=None, label: str | None = None) -> None:
    """The stage's command line as the driver renders it, through the trainer's validation; a refusal is
    said at the key that sets the flag it names (`path`: the stage's, `parallel_path`: its layout's), with
    `label` (a step that is not the stage itself) or the stage when the key is not the stage's own."""
    from megagrow.training.arguments import validate_args
    plan = driver.plan
    argv = driver.stage_argv(stage, where, start, rule, decay_iters, eval_interval, loaded=False)[1:]
    if "--load" in argv:  # the stage's first checkpoint is written by the growth before it; checked there
        at = argv.index("--load")
        del argv[at:at + 2]
    args = _trainer_args(argv, path)
    # Paths as the stage's processes resolve them (check_data said which are missing, with their keys).
    files = {}
    for dest in ("data_path", *DATA_PATHS):
        if getattr(args, dest):
            prefixes = set(_prefixes(getattr(args, dest)))
            setattr(args, dest, [_resolve(p) if p in prefixes else p for p in getattr(args, dest)])
            files.update({_resolve(p): _setting(plan, dest)[0] for p in prefixes})
    for dest in TOKENIZER_PATHS:
        if getattr(args, dest):
            setattr(args, dest, _resolve(getattr(args, dest)))
            files[getattr(args, dest)] = _setting(plan, dest)[0]
    sources = {}
    for name, values in (("target", plan.target), (f"{path}.model", stage.model), ("training", plan.training),
                         (f"{path}.training", stage.training), ("data", plan.data), (parallel_path, stage.parallel)):
        sources.update({key: f"{name}.{key}" for key in values})
    if stage.lr.get("warmup_iters") is not None:
        sources["lr_warmup_iters"] = f"{path}.lr.warmup_iters"  # the driver's flag at a re-warmed stage
    sources["parallel"] = parallel_path
    try:
        validate_args(args, world_size=stage.parallel.get("nproc", 1))
    except MegagrowError as e:
        key = _key_for(str(e), sources, path, files)
        where = label or ("" if key.startswith(path) else f"{path}, {stage.name}")
        raise PlanError(f"{key}: {e}" + (f" (in {where})" if where else "")) from None


def _fits(launcher, nproc: int, count: int, name: str, path: str) -> None:
    """The launcher has room for `count` steps of `nproc` processes at once (released again at once)."""
    slots = []
    try:
        for _ in range(count):
            slots.append(launcher.reserve(nproc, name))
    except MegagrowError as e:
        raise PlanError(f"{path}: {e}") from None
    finally:
        for slot in slots:
            launcher.release(slot)


def preflight(driver, baseline: bool = False) -> None:
    """Raise one PlanError about the first stage (or LAG probe, loss-law probe, baseline) that could not
    start; write nothing."""
    from megagrow.lag.probe import is_lag_selection, probe_stage
    from megagrow.scheduling.pair import members
    from megagrow.scheduling.plan import Stage
    from megagrow.scheduling.timing import StopRule
    plan = driver.plan
    check_data(plan)
    start = 0
    for i, ((stage, where), iters) in enumerate(zip(driver.stages(), plan.planned_iterations())):
        path = f"stages[{i}]"
        rule = driver.rule(i, start, 0.0, fit_law=False)
        if stage.pair:  # two models at once, each on half the processes, with its own seed and data
            for k, (model, folder) in enumerate(members(stage, where, plan.training)):
                shards = model.training.get("data_path") or []
                for prefix in _prefixes([shards] if isinstance(shards, str) else [str(p) for p in shards]):
                    if not all(os.path.isfile(_resolve(prefix) + ext) for ext in (".bin", ".idx")):
                        raise PlanError(f"{path}.pair.data_path[{k}]: {prefix}: .bin or .idx not found"
                                        f"{_where(prefix)}")
                check_stage(driver, model, folder, start, rule, path, f"{path}.parallel",
                            label=f"model {k + 1} of the pair, on half of {path}.parallel.nproc")
            _fits(driver.launcher, stage.parallel.get("nproc", 1) // 2, 2, where.name, f"{path}.parallel.nproc")
        else:
            check_stage(driver, stage, where, start, rule, path, f"{path}.parallel")
            _fits(driver.launcher, stage.parallel.get("nproc", 1), 1, where.name, f"{path}.parallel.nproc")
        if is_lag_selection(stage.grow):  # each probe on `grow.parallel`, `groups` of them at a time
            probe, own = probe_stage(stage), stage.grow.get("parallel") is not None
            at = f"{path}.grow.parallel" if own else f"{path}.parallel"
            check_stage(driver, probe, where, start, rule, path, at)
            _fits(driver.launcher, probe.parallel.get("nproc", 1), int(stage.grow.get("groups", 1)),
                  f"{where.name} LAG probes", f"{at}.nproc" if own else f"{path}.grow.groups")
        if stage.stop["policy"] == "ecr" and "law" not in stage.stop:  # the next model's law: a short run of it
            nxt, iters_ = plan.stages[i + 1], int(stage.stop.get("probe_iters", 50))
            probe = Stage(name=f"probe_{nxt.name}", model=nxt.model, parallel=nxt.parallel, training=nxt.training)
            check_stage(driver, probe, driver.run_dir.law_probe(nxt.name), 0,
                        StopRule(policy="iters", iteration=iters_), f"stages[{i + 1}]", f"stages[{i + 1}].parallel",
                        eval_interval=max(1, iters_ // 10), label=f"the loss-law probe of {nxt.name} for {path}.stop")
        start += iters
    if baseline:  # the target from scratch on the last stage's processes, over the whole budget
        last = len(plan.stages) - 1
        target = Stage(name="baseline", parallel=dict(plan.stages[-1].parallel))
        check_stage(driver, target, driver.run_dir.baseline(), 0,
                    StopRule(policy="flops", flops=plan.budget["flops"]), f"stages[{last}]",
                    f"stages[{last}].parallel", decay_iters=int(plan.budget["flops"] // plan.step_flops()),
                    label="the --baseline run of the target")
