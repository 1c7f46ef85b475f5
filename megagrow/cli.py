"""The `megagrow` command: checkpoint tools (and, later, growth, plans and LAG)."""

from __future__ import annotations

import argparse
import json
import os
import sys



def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024


def cmd_inspect(a) -> int:
    from megagrow.checkpoint.io import inspect
    info = inspect(a.dir)
    if a.json:
        print(json.dumps(info, indent=1))
    else:
        print(f"{info['path']}: {info['format']} checkpoint, {_human(info['size_bytes'])}")
        if "iteration" in info:
            m = info["model"]
            print(f"  iteration {info['iteration']}, TP={info['tensor_model_parallel_size']} "
                  f"PP={info['pipeline_model_parallel_size']}")
            print(f"  model: {m['num_layers']} layers, hidden {m['hidden_size']}, ffn {m['ffn_hidden_size']}, "
                  f"{m['num_attention_heads']} heads / {m['num_query_groups']} query groups, "
                  f"{'SwiGLU' if m['swiglu'] else 'GeLU'}, {m['normalization']}, "
                  f"{'tied' if m['tied_embeddings'] else 'untied'} embeddings, vocab {m['padded_vocab_size']} (padded)")
            print(f"  parameters: {info['parameters']:,}")
            print(f"  optimizer: {info['optimizer'] or 'none'}")
        if "trainer_flags" in info:
            print(f"  trainer flags: {' '.join(info['trainer_flags'])}")
        print("  complete: yes" if info["complete"] else "  complete: NO\n" + "\n".join(
            f"    - {p}" for p in info["problems"]))
    if not info["complete"]:
        print(f"error: {info['path']} is incomplete: {info['problems'][0]}", file=sys.stderr)
        return 1
    return 0


def cmd_convert(a) -> int:
    from megagrow.checkpoint.convert import convert
    out = convert(a.load, a.save, a.target_tp, a.target_pp, a.ckpt_format, not a.no_optimizer, a.force,
                  progress=not a.quiet, rechunk=a.rechunk, target_vpp=a.target_vpp)
    print(f"wrote {out}")
    return 0


def cmd_export(a) -> int:
    from megagrow.checkpoint.export import export
    out = export(a.load, a.save, a.hf_family, a.max_shard_size, a.force, progress=not a.quiet)
    print(f"wrote {out['path']} ({out['config']['architectures'][0]})")
    if out["tokenizer"]:
        print(f"  tokenizer copied from {out['tokenizer']}")
    else:
        print("  no Hugging Face tokenizer recorded in the checkpoint: save the tokenizer into it "
              "(AutoTokenizer.from_pretrained(...).save_pretrained(SAVE)) before loading it with AutoTokenizer")
    return 0


def cmd_grow(a) -> int:
    from megagrow.growth.grow import grow
    sizes = {f: getattr(a, f) for f in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                        "num_query_groups")}
    grown = grow(a.load, a.save, a.op, sizes, a.target_tp, a.target_pp, a.ckpt_format, seed=a.seed,
                 with_optimizer=not a.no_optimizer, force=a.force, progress=not a.quiet, rechunk=a.rechunk,
                 data_path=a.data_path, vpp=a.target_vpp, second=a.load_second)
    print(grown.report)
    print(f"wrote {grown.path}")
    return 0


def cmd_ops_list(a) -> int:
    from megagrow.growth.registry import operators_table
    print(operators_table())
    return 0


class _HelpWithOperators(argparse.Action):
    """-h of `checkpoint grow`: its epilog lists the registry's operators, imported (torch) only when asked for."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest, nargs=0, default=default, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from megagrow.growth.registry import operators_table
        parser.epilog = "operators (--op NAME[:PARAMS]):\n" + operators_table()
        parser.print_help()
        parser.exit()


def cmd_plan(a, rest: list[str]) -> int:
    from megagrow.scheduling.plan import describe, dump_plan, make_plan
    from megagrow.scheduling.timing import PlanError
    from megagrow.training.flags import from_argv

    def checked_options() -> dict | None:
        """The command's own flags, one line each naming the flag; the --policy-options object."""
        for flag, value in (("--nproc", a.nproc), ("--lag", a.lag), ("--lag-groups", a.lag_groups),
                            ("--stages", a.stages)):
            if value is not None and value < 1:
                raise PlanError(f"plan: {flag} must be at least 1, got {value}")
        for flag, value in (("--train-tokens", a.train_tokens), ("--budget-flops", a.budget_flops)):
            if value is not None and not value > 0:
                raise PlanError(f"plan: {flag} must be positive, got {value:g}")
        if not 0 < a.max_small_fraction <= 1:
            raise PlanError(f"plan: --max-small-fraction must be in (0, 1], got {a.max_small_fraction:g}")
        if a.output:
            folder = os.path.dirname(os.path.abspath(a.output))
            if os.path.isdir(a.output):
                raise PlanError(f"plan: --output {a.output} is a directory (give the plan file to write)")
            if not os.path.isdir(folder):
                raise PlanError(f"plan: --output {a.output}: the folder {folder} does not exist")
        if not a.policy_options:
            return None
        try:
            options = json.loads(a.policy_options)
        except json.JSONDecodeError as e:
            raise PlanError(f"plan: --policy-options is not JSON ({e.msg} at character {e.pos}): "
                            f"{a.policy_options}") from None
        if not isinstance(options, dict):
            raise PlanError(f"plan: --policy-options must be a JSON object of stop-rule fields, got "
                            f"{a.policy_options}")
        return options

    options = checked_options()  # this command's own flags, before any plan is made
    g = from_argv(rest)
    target, data = g.get("model", {}), g.get("data", {})
    training = {**g.get("training", {}), **g.get("performance", {}), **g.get("logging", {}),
                **g.get("checkpointing", {})}
    for key in ("num_layers", "hidden_size", "num_attention_heads"):
        if key not in target:
            raise PlanError(f"plan: the target's --{key.replace('_', '-')} is required")
    training.setdefault("seq_length", target.pop("seq_length", 1024))
    target.pop("seq_length", None)
    training.setdefault("global_batch_size", training.get("micro_batch_size", 1))
    training.setdefault("micro_batch_size", 1)
    training.setdefault("lr", 3e-4)
    vocab = data.get("vocab_size")
    if vocab is None and (data.get("tokenizer_model") or data.get("vocab_file")):
        from megagrow.data.tokenizer import TokenizerError, tokenizer_flags, tokenizer_from_args
        if tokenizer_flags(data)["tokenizer_type"] == "NullTokenizer":
            raise PlanError("plan: --tokenizer-type NullTokenizer needs --vocab-size")
        try:
            vocab = tokenizer_from_args(data).vocab_size
        except TokenizerError as e:
            raise PlanError(f"plan: {e}") from None
    if vocab is None:
        raise PlanError("plan: give --tokenizer-model or --vocab-size (FLOPs and sizes depend on it)")
    parallel = {**g.get("parallelism", {}), "nproc": a.nproc}
    parallel.pop("distributed_backend", None)
    plan = make_plan(target, vocab, training, data, flops=a.budget_flops, tokens=a.train_tokens,
                     growth_factor=a.growth_factor, stages=a.stages, op=a.op, policy=a.policy,
                     max_small_fraction=a.max_small_fraction, parallel=parallel, policy_options=options,
                     lag_k=a.lag, lag_groups=a.lag_groups)
    print(describe(plan))
    if a.output:
        with open(a.output, "w") as f:
            f.write(dump_plan(plan))
        print(f"wrote {a.output}")
    else:
        print(dump_plan(plan))
    return 0


def cmd_run(a) -> int:
    from megagrow.launching import Resources
    from megagrow.scheduling.driver import default_run_dir, dry_run, run
    resources = Resources(a.nodes, a.nproc_per_node, a.cpus_per_node, a.gpus_per_node)
    if a.dry_run:
        print("\n".join(dry_run(a.plan, a.output, a.launcher, resources, a.baseline)))
        return 0
    summary = run(a.plan, a.output, baseline=a.baseline, progress=not a.quiet, launcher=a.launcher,
                  resources=resources)
    if summary.get("speedup") is not None:
        print(f"speed-up: {summary['speedup']:.2f}")
    print(f"report: {os.path.join(default_run_dir(a.plan, a.output), 'report.md')}")
    return 0


def cmd_lag_analyze(a) -> int:
    from megagrow.lag.analysis import analyze_run
    for lag, s in analyze_run(a.run_dir).items():
        _print_lag(lag, s)
    return 0


def cmd_lag_study(a) -> int:
    from megagrow.lag.study import study
    for lag, s in study(a.load, a.num_layers, a.steps, a.output, a.space, a.candidates or (), a.groups, a.nproc,
                        a.eval_interval, a.time_limit).items():
        _print_lag(lag, s)
    return 0


def _print_lag(lag: str, s: dict) -> None:
    def num(x):
        return "nan" if x is None else f"{x:+.3f}"
    print(f"{lag}: {len(s['specs'])} candidates, final best {s['final_best']}; ordering settles at step "
          f"{s['settling_step']}")
    print(f"{'step':>6} {'pearson':>8} {'spearman':>8} {'recall@1':>8} {'regret':>8}  chosen")
    for i, step in enumerate(s["steps"]):
        print(f"{step:>6} {num(s['pearson'][i]):>8} {num(s['spearman'][i]):>8} {s['recall_at_k']['1'][i]:>8} "
              f"{num(s['regret'][i]):>8}  {s['chosen'][i]}")
    print(f"figures and lag_analysis.json in {os.path.join(os.path.dirname(lag), 'analysis')}")


def cmd_demo(a) -> int:
    from megagrow.demo import demo
    try:
        output = a.output or ("runs/demo_quick" if a.quick else "runs/demo")  # a run dir holds one plan
        demo(output, a.data, a.quick, a.vocab_size)
    except (FileNotFoundError, RuntimeError) as e:  # a missing corpus, a failing data tool
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse that says a usage mistake in one line (argparse's exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="megagrow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ck = sub.add_parser("checkpoint", help="inspect, convert, grow and export checkpoints (Megatron or Hugging Face)").add_subparsers(
        dest="action", required=True)
    i = ck.add_parser("inspect", help="format, layout, model shape and completeness of a checkpoint")
    i.add_argument("dir", help="checkpoint root (with latest_checkpointed_iteration.txt) or iter_N directory")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)
    c = ck.add_parser("convert", help="rewrite a checkpoint at another TP/PP and/or format")
    c.add_argument("--load", required=True)
    c.add_argument("--save", required=True)
    c.add_argument("--target-tp", type=int, default=None)
    c.add_argument("--target-pp", type=int, default=None)
    c.add_argument("--target-vpp", type=int, default=None,
                   help="model chunks per pipeline rank (Megatron-LM's --num-virtual-stages-per-pipeline-rank; "
                        "1: none; default: the source's at the same PP)")
    c.add_argument("--ckpt-format", default=None,
                   help="torch_dist or torch; default: the source's (torch_dist from a Hugging Face model)")
    c.add_argument("--no-optimizer", action="store_true", help="drop the optimizer state")
    c.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    c.add_argument("--rechunk", action="store_true",
                   help="torch_dist to torch_dist: rewrite tensors in the chunks the target ranks would save "
                        "(default: copy the stored chunks as they are, which is valid at any TP/PP and faster)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    e = ck.add_parser("export", help="write a checkpoint as a Hugging Face model directory (safetensors)")
    e.add_argument("--load", required=True, help="a Megatron checkpoint (any TP/PP, torch_dist or torch)")
    e.add_argument("--save", required=True, help="the Hugging Face model directory to write")
    e.add_argument("--hf-family", choices=["llama", "mistral", "qwen2", "qwen3"], default=None,
                   help="default: the family the shape implies (q/k norms: qwen3; a QKV bias alone: qwen2; llama)")
    e.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (transformers' spelling)")
    e.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_export)

    g = ck.add_parser("grow", help="grow a checkpoint with a growth operator (megagrow ops list)", add_help=False,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    g.add_argument("-h", "--help", action=_HelpWithOperators, help="show this help, with the operators, and exit")
    g.add_argument("--load", required=True)
    g.add_argument("--load-second", default=None,
                   help="mixture: the second trained model, of the same shape as --load (its iteration, optimizer "
                        "step and schedule are --load's)")
    g.add_argument("--save", required=True)
    g.add_argument("--op", required=True, help="operator spec NAME[:PARAMS], e.g. stack:g=4, lag:p=2,b=1,init=dup, "
                   "partial:12-3456*5-56 (operators below)")
    g.add_argument("--num-layers", type=int, default=None, help="depth of the grown model")
    for flag in ("--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups"):
        g.add_argument(flag, type=int, default=None, help="width of the grown model")
    g.add_argument("--target-tp", type=int, default=None)
    g.add_argument("--target-pp", type=int, default=None)
    g.add_argument("--target-vpp", type=int, default=None,
                   help="model chunks per pipeline rank (Megatron-LM's --num-virtual-stages-per-pipeline-rank; "
                        "1: none; default: the source's at the same PP)")
    g.add_argument("--ckpt-format", default=None, help="torch or torch_dist (default: the source's)")
    g.add_argument("--seed", type=int, default=None, help="for new random parameters (default: the run's --seed)")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="learn: data to fit the growth maps on (default: the checkpoint's --data-path)")
    g.add_argument("--no-optimizer", action="store_true", help="drop the optimizer state")
    g.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    g.add_argument("--rechunk", action="store_true", help="write through the streaming writer even for pure copies")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_grow)

    pl = sub.add_parser("plan", help="write a staged plan (YAML) from a target shape and budget; other flags are "
                        "Megatron-LM's (target model, training, data, parallelism)")
    budget = pl.add_mutually_exclusive_group(required=True)
    budget.add_argument("--train-tokens", type=float, help="budget: the tokens a scratch run of the target would see")
    budget.add_argument("--budget-flops", type=float, help="budget in FLOPs (Megatron-LM's formula)")
    pl.add_argument("--growth-factor", type=int, default=4, help="g: the small model has L/g layers (2..4)")
    pl.add_argument("--stages", type=int, default=2, help="2: one hop; more: gradual stacking")
    pl.add_argument("--op", choices=["stack", "last"], default="stack", help="stack:g or lag:last between stages")
    pl.add_argument("--policy", choices=["formula", "tokens", "iters", "converge", "ecr"], default="formula",
                    help="when to leave the small stages (the last always runs to the budget)")
    pl.add_argument("--policy-options", default=None, help='JSON, e.g. \'{"threshold": 1e-4, "window": 4}\'')
    pl.add_argument("--max-small-fraction", type=float, default=0.25,
                    help="clamp the formula's small-model tokens to this share of the budget's tokens")
    pl.add_argument("--nproc", type=int, default=1, help="processes per stage (TP x PP x DP)")
    pl.add_argument("--lag", type=int, default=None, metavar="K",
                    help="choose each growth operator by LAG@K (adaptive stacking with --stages > 2)")
    pl.add_argument("--lag-groups", type=int, default=1, help="LAG probes running at a time")
    pl.add_argument("--output", default=None, help="plan file to write (default: print it)")
    pl.set_defaults(func=cmd_plan, takes_rest=True)
    r = sub.add_parser("run", help="run a staged plan: train, grow, train ... (resumes where it stopped)")
    r.add_argument("plan")
    r.add_argument("--output", default=None, help="run directory (default: PLAN without .yaml + _run)")
    r.add_argument("--baseline", action="store_true", help="also train the target from scratch on the same budget")
    r.add_argument("--quiet", action="store_true")
    from megagrow.launching import LAUNCHERS
    r.add_argument("--launcher", choices=["auto", *LAUNCHERS.names()], default="auto",
                   help="job steps as torchrun here, or srun inside a SLURM allocation (auto: srun when in one)")
    r.add_argument("--dry-run", action="store_true",
                   help="print the growth and launch commands the run would execute, in order; run and write nothing")
    r.add_argument("--nodes", type=int, default=None,
                   help="slurm: nodes of the allocation (default: the allocation's; needed outside one)")
    r.add_argument("--nproc-per-node", type=int, default=None,
                   help="slurm: ranks per node (default: the allocation's GPUs per node, else its tasks per node)")
    r.add_argument("--cpus-per-node", type=int, default=None, help="slurm: default: the allocation's")
    r.add_argument("--gpus-per-node", type=int, default=None, help="slurm: default: the allocation's")
    r.set_defaults(func=cmd_run)

    d = sub.add_parser("demo", help="a staged run against training from scratch on the same FLOPs budget, "
                       "with the report and the speed-up (about 12 minutes on 2 cores; --quick: 2)")
    d.add_argument("--output", default=None, help="default: runs/demo (runs/demo_quick with --quick)")
    d.add_argument("--data", default=None, help="a JSONL corpus ({\"text\": ...} per line); default: the embedded one")
    d.add_argument("--quick", action="store_true", help="a small budget: checks the pipeline, not the speed-up")
    d.add_argument("--vocab-size", type=int, default=2048, help="of the sentencepiece tokenizer trained on the data")
    d.set_defaults(func=cmd_demo)
    lag = sub.add_parser("lag", help="Landscape-Aware Growing: analyses and studies").add_subparsers(
        dest="action", required=True)
    la = lag.add_parser("analyze", help="correlations, recall@k, regret of a run's LAG probes; figures")
    la.add_argument("run_dir")
    la.set_defaults(func=cmd_lag_analyze)
    ls = lag.add_parser("study", help="grow a checkpoint with every candidate, train each to the end, analyse")
    ls.add_argument("--load", required=True)
    ls.add_argument("--num-layers", type=int, required=True, help="depth of the grown models")
    ls.add_argument("--steps", type=int, required=True, help="iterations each grown model trains")
    ls.add_argument("--output", required=True)
    ls.add_argument("--space", choices=["all", "dup", "none"], default="all", help="LAG's design space for L -> L'")
    ls.add_argument("--candidates", nargs="*", default=None, help="more operator specs")
    ls.add_argument("--groups", type=int, default=1, help="candidates training at a time")
    ls.add_argument("--nproc", type=int, default=1, help="processes per candidate")
    ls.add_argument("--eval-interval", type=int, default=None, help="default: steps / 20")
    ls.add_argument("--time-limit", type=float, default=None, help="seconds per candidate")
    ls.set_defaults(func=cmd_lag_study)

    ops = sub.add_parser("ops", help="growth operators").add_subparsers(dest="action", required=True)
    ops.add_parser("list", help="every operator, what it changes, whether it preserves the function").set_defaults(
        func=cmd_ops_list)
    return p


def _main(argv: list[str] | None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    if rest and not getattr(args, "takes_rest", False):
        print(f"error: unrecognized arguments: {' '.join(rest)}", file=sys.stderr)
        return 2
    for flag in ("target_tp", "target_pp", "target_vpp"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 1
    from megagrow.launching.job_step import Interrupted
    try:
        return args.func(args, rest) if getattr(args, "takes_rest", False) else args.func(args)
    except Interrupted as e:
        print(f"interrupted: {e}", file=sys.stderr)
        return 143


def main(argv: list[str] | None = None) -> int:
    from megagrow.entry import guarded
    return guarded(lambda: _main(argv), all_ranks_agree=False)


def console() -> None:
    """The `megagrow` command: main(), then the exit. The objects torch's import made are frozen first, so that the
    interpreter's last garbage collection skips them (it walked them for ~0.7 s); every command closes its files."""
    code = main()
    import gc
    gc.freeze()
    sys.exit(code)


if __name__ == "__main__":
    console()
