"""The `megagrow` command: checkpoint tools (and, later, growth, plans and LAG)."""

from __future__ import annotations

import argparse
import json
import sys

from megagrow.checkpoint.errors import CheckpointError


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.1f} {unit}"
        n /= 1024


def cmd_inspect(a) -> int:
    from megagrow.checkpoint.convert import inspect
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
        print("  complete: yes" if info["complete"] else "  complete: NO\n" + "\n".join(
            f"    - {p}" for p in info["problems"]))
    return 0 if info["complete"] else 1


def cmd_convert(a) -> int:
    from megagrow.checkpoint.convert import convert
    out = convert(a.load, a.save, a.target_tp, a.target_pp, a.ckpt_format, not a.no_optimizer, a.force,
                  progress=not a.quiet, rechunk=a.rechunk)
    print(f"wrote {out}")
    return 0


def cmd_grow(a) -> int:
    from megagrow.growth.grow import grow, plan_report
    from megagrow.growth.depth import GrowthError
    sizes = {f: getattr(a, f) for f in ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")}
    if any(v is not None for v in sizes.values()):
        if a.num_layers is not None:
            raise GrowthError("grow depth (--num-layers) and width (--hidden-size ...) in two steps, one operator each")
        from megagrow.growth.grow import grow_width
        out = grow_width(a.load, a.save, a.op, sizes, a.target_tp, a.target_pp, a.ckpt_format, a.seed,
                         not a.no_optimizer, a.force, progress=not a.quiet)
        print(f"wrote {out}")
        return 0
    out, plan = grow(a.load, a.save, a.op, a.num_layers, a.target_tp, a.target_pp, a.ckpt_format, a.seed,
                     not a.no_optimizer, a.force, progress=not a.quiet, rechunk=a.rechunk)
    print(plan_report(plan))
    print(f"wrote {out}")
    return 0


def cmd_ops_list(a) -> int:
    from megagrow.growth.operators import OPERATORS
    from megagrow.growth.width import WIDTH_OPERATORS
    print(f"{'operator':<12} {'grows':<6} {'function-preserving':<20} what it does")
    rows = [(op.name, op.dimension, op.preserves_function, op.summary) for op in OPERATORS.values()]
    rows += [(name, "width", keeps, summary) for name, (keeps, summary) in WIDTH_OPERATORS.items()]
    for name, dimension, keeps, summary in rows:
        print(f"{name:<12} {dimension:<6} {'yes' if keeps else 'no':<20} {summary}")
    print("depth operators take --num-layers; width operators take --hidden-size/--ffn-hidden-size/"
          "--num-attention-heads/--num-query-groups")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megagrow", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    ck = sub.add_parser("checkpoint", help="inspect and convert Megatron checkpoints").add_subparsers(
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
    c.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default=None)
    c.add_argument("--no-optimizer", action="store_true", help="drop the optimizer state")
    c.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    c.add_argument("--rechunk", action="store_true",
                   help="torch_dist to torch_dist: rewrite tensors in the chunks the target ranks would save "
                        "(default: copy the stored chunks as they are, which is valid at any TP/PP and faster)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_convert)

    g = ck.add_parser("grow", help="grow a checkpoint with a growth operator (megagrow ops list)")
    g.add_argument("--load", required=True)
    g.add_argument("--save", required=True)
    g.add_argument("--op", required=True, help="operator spec, e.g. stack:g=4, lag:p=2,b=1,init=dup, partial:12-3456*5-56")
    g.add_argument("--num-layers", type=int, default=None, help="depth of the grown model")
    for flag in ("--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups"):
        g.add_argument(flag, type=int, default=None, help="width of the grown model")
    g.add_argument("--target-tp", type=int, default=None)
    g.add_argument("--target-pp", type=int, default=None)
    g.add_argument("--ckpt-format", choices=["torch", "torch_dist"], default=None)
    g.add_argument("--seed", type=int, default=None, help="for new random parameters (default: the run's --seed)")
    g.add_argument("--no-optimizer", action="store_true", help="drop the optimizer state")
    g.add_argument("--force", action="store_true", help="replace a non-empty --save directory")
    g.add_argument("--rechunk", action="store_true", help="write through the streaming writer even for pure copies")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(func=cmd_grow)

    ops = sub.add_parser("ops", help="growth operators").add_subparsers(dest="action", required=True)
    ops.add_parser("list", help="every operator, what it changes, whether it preserves the function").set_defaults(
        func=cmd_ops_list)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in ("target_tp", "target_pp"):
        if getattr(args, flag, None) is not None and getattr(args, flag) < 1:
            print(f"error: --{flag.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 1
    try:
        return args.func(args)
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
