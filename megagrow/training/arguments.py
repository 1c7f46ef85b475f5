"""Command-line arguments: Megatron-LM's flag names, validated before any process group exists.

Only the flags megagrow acts on are defined; each keeps Megatron-LM's name, default and meaning.
`validate_args` turns every inconsistency into one `ArgumentError` line, so a bad launch fails in
seconds with a message rather than in a collective minutes later.
"""

from __future__ import annotations

import argparse
import math
import os

from megagrow.data.tokenizer import TOKENIZER_TYPES
from megagrow.errors import MegagrowError
from megagrow.model.shape import default_ffn_hidden_size


class ArgumentError(MegagrowError):
    """A user-facing configuration problem; printed as one line, exit code 1."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4*hidden (or 8/3*hidden with --swiglu)")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--group-query-attention", action="store_true")
    g.add_argument("--num-query-groups", type=int, default=1)
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, dest="layernorm_epsilon")  # Megatron-LM's dest
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="default: transformer_engine when it is installed and CUDA is present, else local")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None)
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--fp16", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--optimizer", choices=["adam", "sgd"], default="adam")
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="linear")
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   default="exponential", help="WSD: the shape of the final decay")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="WSD: iterations of the final decay")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="WSD: samples of the final decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-init", type=float, default=0.0)
    g.add_argument("--exit-interval", type=int, default=None, help="stop after this many iterations (for tests and requeue)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM or SIGUSR1 (scancel, a SLURM time-limit warning), save a checkpoint and exit")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", action="store_false", dest="check_for_nan_in_loss_and_grad",
                   help="as Megatron-LM: by default a NaN or Inf loss or gradient norm stops the run (nothing "
                        "of that iteration is saved); this flag trains on")
    g = p.add_argument_group("growth stages (megagrow)")
    g.add_argument("--growth-plan", default=None, help="run a staged plan (YAML, `megagrow plan`) from this entry point")
    g.add_argument("--stage-stop", default=None,
                   help="JSON stop rule of this stage (megagrow.scheduling.timing.StopRule): save and exit when it fires")
    g.add_argument("--stage-decision-file", default=None, help="where the stop rule's decision and evidence go (JSON)")
    g.add_argument("--eval-on-start", action="store_true",
                   help="evaluate once after loading, before training (a stage continuing from a LAG probe)")
    g.add_argument("--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true",
                   dest="override_opt_param_scheduler",
                   help="on --load, train with this run's LR schedule, weight decay, Adam betas and eps, not the "
                        "checkpoint's (Adam's moments and step counts still load)")
    g.add_argument("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler",
                   action="store_true", dest="use_checkpoint_opt_param_scheduler",
                   help="on --load, keep the checkpoint's LR schedule and optimizer hyper-parameters")
    g.add_argument("--restart-lr-schedule-at", type=int, default=None,
                   help="when the loaded checkpoint is at this iteration, start the LR schedule afresh from these "
                        "flags (re-warm at a stage boundary) instead of the checkpoint's")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with CUDA, gloo without")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None, help="prefix, or weight prefix weight prefix ...")
    g.add_argument("--split", default="969,30,1")
    g.add_argument("--data-cache-path", default=None)
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="as Megatron-LM: GPTSentencePieceTokenizer is the model's own vocabulary, "
                        "SentencePieceTokenizer appends <CLS> <SEP> <EOD> <MASK> to it")
    g.add_argument("--vocab-extra-ids", type=int, default=0, help="<extra_id_i> tokens (SentencePieceTokenizer)")
    g.add_argument("--tokenizer-model", default=None)
    g.add_argument("--vocab-size", type=int, default=None, help="for NullTokenizer")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None)
    g.add_argument("--load", default=None)
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--ckpt-format", choices=["torch_dist", "torch"], default="torch_dist")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_const", const="fully_reshardable",
                   dest="dist_ckpt_optim_sharding", default="fully_reshardable",
                   help="as Megatron-LM (megagrow's default already)")
    g.add_argument("--dist-ckpt-optim-sharding", choices=["fully_reshardable", "dp_reshardable"],
                   default="fully_reshardable",
                   help="megagrow: how torch_dist stores the distributed optimizer. fully_reshardable loads at any "
                        "TP/PP/DP; dp_reshardable (Megatron-LM's default) is megatron-core's bucket layout, "
                        "reloadable at another DP only")
    g.add_argument("--no-load-optim", action="store_true")
    g.add_argument("--no-load-rng", action="store_true")
    g.add_argument("--finetune", action="store_true", help="load weights only; iteration starts at 0")


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None,
                   help="megagrow: append one JSON line per iteration and evaluation (full-precision losses)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A flag argparse cannot read is one line too (argparse would print its whole usage, exit 2)."""
        raise ArgumentError(f"{message} (pretrain_gpt.py --help lists the flags)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="megagrow GPT pre-training (Megatron-LM flags)", allow_abbrev=False)
    for add in (_add_model_args, _add_training_args, _add_parallel_args, _add_data_args,
                _add_checkpoint_args, _add_logging_args):
        add(p)
    return p


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ArgumentError(message)


# Sizes, counts and intervals with the least value each can take (an optional one left unset is fine).
AT_LEAST = {1: ("--num-layers", "--hidden-size", "--ffn-hidden-size", "--num-attention-heads", "--num-query-groups",
                "--kv-channels", "--seq-length", "--max-position-embeddings", "--micro-batch-size",
                "--global-batch-size", "--train-iters", "--lr-decay-iters", "--lr-wsd-decay-iters",
                "--lr-wsd-decay-samples", "--exit-interval", "--tensor-model-parallel-size",
                "--pipeline-model-parallel-size", "--log-interval", "--eval-interval", "--save-interval",
                "--make-vocab-size-divisible-by", "--vocab-size", "--rotary-base"),
            0: ("--eval-iters", "--lr-warmup-iters", "--vocab-extra-ids", "--restart-lr-schedule-at", "--seed")}
# Real-valued flags: finite and inside an interval, written as in the message.
RANGES = {"--lr": "[0, inf)", "--min-lr": "[0, inf)", "--lr-warmup-init": "[0, inf)", "--weight-decay": "[0, inf)",
          "--clip-grad": "[0, inf)", "--adam-eps": "[0, inf)", "--adam-beta1": "[0, 1)", "--adam-beta2": "[0, 1)",
          "--hidden-dropout": "[0, 1]", "--attention-dropout": "[0, 1]", "--init-method-std": "[0, inf)",
          "--norm-epsilon": "[0, inf)", "--rotary-percent": "(0, 1]"}
# Where a run writes, and what each must be: checked before anything is written.
OUTPUTS = {"--save": "directory", "--tensorboard-dir": "directory", "--data-cache-path": "directory",
           "--metrics-file": "file", "--stage-decision-file": "file"}
READ_ONLY_OK = ("--data-cache-path",)  # an index cache that exists is only read


def _dest(flag: str) -> str:
    return {"--norm-epsilon": "layernorm_epsilon"}.get(flag, flag[2:].replace("-", "_"))


def _check_ranges(args: argparse.Namespace) -> None:
    for least, flags in AT_LEAST.items():
        for flag in flags:
            value = getattr(args, _dest(flag))
            _require(value is None or value >= least, f"{flag} {value}: must be {'positive' if least else '0 or more'}")
    for flag, spec in RANGES.items():
        value = getattr(args, _dest(flag))
        low, high = (float(x) for x in spec[1:-1].split(", "))
        inside = ((low < value if spec[0] == "(" else low <= value)
                  and (value < high if spec[-1] == ")" else value <= high))
        _require(math.isfinite(value) and inside, f"{flag} {value:g}: must be a number in {spec}")


def _check_output(flag: str, path: str, kind: str) -> None:
    if os.path.exists(path):
        _require(os.path.isdir(path) == (kind == "directory"), f"{flag} {path}: exists and is not a {kind}")
        _require(flag in READ_ONLY_OK or os.access(path, os.W_OK), f"{flag} {path}: not writable")
        return
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    _require(os.path.isdir(parent), f"{flag} {path}: cannot be created ({parent} is a file)")
    _require(os.access(parent, os.W_OK), f"{flag} {path}: cannot be created ({parent} is not writable)")


def _check_schedule(a: argparse.Namespace) -> None:
    """What megatron-core's OptimizerParamScheduler asserts, said beforehand in Megatron-LM's flag names."""
    decay, name = (a.lr_decay_iters, "--lr-decay-iters") if a.lr_decay_iters else (a.train_iters, "--train-iters")
    _require(a.lr >= a.min_lr, f"--lr {a.lr:g} is below --min-lr {a.min_lr:g}")
    _require(a.lr_warmup_init <= a.lr, f"--lr-warmup-init {a.lr_warmup_init:g} exceeds --lr {a.lr:g}")
    _require(a.lr_warmup_iters < decay, f"--lr-warmup-iters {a.lr_warmup_iters} must be below {name} {decay} "
                                        "(the LR decays over those iterations, after its warmup)")
    if a.lr_decay_style != "WSD":
        return
    _require(a.lr_wsd_decay_iters is not None or a.lr_wsd_decay_samples is not None,
             "--lr-decay-style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples (its final decay)")
    if a.lr_wsd_decay_iters is not None:
        _require(a.lr_wsd_decay_iters <= decay, f"--lr-wsd-decay-iters {a.lr_wsd_decay_iters} exceeds {name} {decay} "
                                                "(the final decay is their last part)")
    else:
        _require(a.lr_wsd_decay_samples <= decay * a.global_batch_size,
                 f"--lr-wsd-decay-samples {a.lr_wsd_decay_samples} exceeds {name} {decay} x --global-batch-size "
                 f"{a.global_batch_size} (the final decay is their last part)")


def _data_prefixes(data_path: list[str]) -> list[str]:
    """Megatron-LM's --data-path: `prefix ...`, or a blend `weight prefix weight prefix ...`."""
    from megagrow.data.indexed import blend
    parsed = blend(data_path)
    _require(parsed is not None,
             f"--data-path {' '.join(data_path)}: expected prefixes, or weights and prefixes in turn "
             "(weight prefix weight prefix ...)")
    weights, prefixes = parsed
    for w in weights or []:
        _require(math.isfinite(w) and w > 0, f"--data-path: weight {w:g} must be positive")
    return prefixes


def _check_data(args: argparse.Namespace) -> None:
    from megagrow.data.indexed import check_split, split_matrix
    _require(bool(args.data_path), "--data-path is required")
    prefixes = _data_prefixes(args.data_path)
    for prefix in prefixes:
        _require(os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"),
                 f"data path not found: {prefix} (expected {prefix}.bin and {prefix}.idx)")
    train, valid, _ = split_matrix(args.split)
    _require(train is not None, f"--split {args.split} leaves no training split")
    _require(valid is not None or not args.eval_iters,
             f"--split {args.split} leaves no validation split to evaluate on (pass --eval-iters 0)")
    for prefix in prefixes:
        check_split(prefix, args.split)  # the index and the .bin agree, and every split gets tokens


def _check_tokenizer(args: argparse.Namespace) -> None:
    if args.tokenizer_type is None:
        args.tokenizer_type = "GPTSentencePieceTokenizer" if args.tokenizer_model else "NullTokenizer"
    if args.tokenizer_type == "NullTokenizer":
        _require(args.vocab_size is not None, "--vocab-size is required with NullTokenizer")
        return
    _require(bool(args.tokenizer_model), f"--tokenizer-model is required with {args.tokenizer_type}")
    _require(os.path.isfile(args.tokenizer_model), f"tokenizer model not found: {args.tokenizer_model}")
    from megagrow.data.tokenizer import sentencepiece_problem
    problem = sentencepiece_problem(args.tokenizer_model)
    _require(problem is None, f"--tokenizer-model {args.tokenizer_model}: not a sentencepiece model ({problem})")


def _check_load(root: str, same_as_save: bool) -> None:
    """A --load that every rank reads the same way: an incomplete or unreadable checkpoint (a truncated
    shard, an empty common.pt) is the same one line on every rank before any rank loads, rather than
    an EOFError on one rank and lost connections on the others. Metadata and file sizes only."""
    from megagrow.checkpoint.errors import CheckpointError, read_tracker
    from megagrow.checkpoint.io import check_loadable, check_source, open_checkpoint
    check_loadable(root, same_as_save=same_as_save)
    if read_tracker(root) is None:
        return  # `--load X --save X` on a fresh X
    try:
        view = open_checkpoint(root)
        try:
            check_source(view, with_optimizer=False)
        finally:
            view.close()
    except CheckpointError as e:
        message = str(e)
        if not message.startswith("--load"):  # name the flag; the files by their place in the checkpoint
            message = f"--load {root}: " + message.replace(os.path.join(root, ""), "")
        raise CheckpointError(message) from None


def validate_args(args: argparse.Namespace, world_size: int | None = None) -> argparse.Namespace:
    """Check consistency and fill derived values (Megatron-LM's names). Raises ArgumentError (or, for
    --load, CheckpointError); each is one line naming the flag and its value."""
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    _check_ranges(args)
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    _require(world_size % (tp * pp) == 0,
             f"world size {world_size} is not divisible by tensor ({tp}) x pipeline ({pp}) parallel size")
    args.world_size = world_size
    args.data_parallel_size = world_size // (tp * pp)

    _require(args.hidden_size % args.num_attention_heads == 0,
             f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}")
    _require(args.num_attention_heads % tp == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by "
             f"--tensor-model-parallel-size {tp}")
    if not args.group_query_attention:
        args.num_query_groups = args.num_attention_heads
    _require(args.num_attention_heads % args.num_query_groups == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by "
             f"--num-query-groups {args.num_query_groups}")
    _require(args.num_query_groups % tp == 0,
             f"--num-query-groups {args.num_query_groups} is not divisible by --tensor-model-parallel-size {tp}")
    _require(args.num_layers % pp == 0,
             f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    if args.ffn_hidden_size is None:
        args.ffn_hidden_size = default_ffn_hidden_size(args.hidden_size, args.swiglu)
    _require(args.ffn_hidden_size % tp == 0,
             f"--ffn-hidden-size {args.ffn_hidden_size} is not divisible by --tensor-model-parallel-size {tp}")
    if args.max_position_embeddings is None:
        args.max_position_embeddings = args.seq_length
    _require(args.position_embedding_type == "rope" or args.seq_length <= args.max_position_embeddings,
             f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}")

    mbs_x_dp = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size is None:
        args.global_batch_size = mbs_x_dp
    _require(args.global_batch_size % mbs_x_dp == 0,
             f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
             f"{args.micro_batch_size} x data-parallel size {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // mbs_x_dp
    _check_schedule(args)

    _require(not (args.bf16 and args.fp16), "--bf16 and --fp16 are mutually exclusive")
    _require(not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
             "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually exclusive")
    _require(not (args.ckpt_format == "torch" and args.use_distributed_optimizer),
             "--ckpt-format torch with --use-distributed-optimizer is not supported (use torch_dist)")
    _require(not args.eval_on_start or args.eval_iters > 0, "--eval-on-start needs --eval-iters above 0")
    _require(args.save_interval is None or args.save is not None, "--save-interval needs --save")
    for flag, kind in OUTPUTS.items():
        if getattr(args, _dest(flag)) is not None:
            _check_output(flag, getattr(args, _dest(flag)), kind)
    _check_data(args)
    _check_tokenizer(args)

    if args.stage_stop is not None:
        import json
        from megagrow.scheduling.timing import PlanError, StopRule
        try:
            StopRule(**json.loads(args.stage_stop))
        except (ValueError, TypeError, PlanError) as e:
            raise ArgumentError(f"--stage-stop: {e}") from None
    if args.load is not None:
        _check_load(args.load, same_as_save=args.load == args.save)
    return args


def parse_args(argv: list[str] | None = None, world_size: int | None = None) -> argparse.Namespace:
    return validate_args(build_parser().parse_args(argv), world_size)
