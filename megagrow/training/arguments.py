"""Command-line arguments: Megatron-LM's flag names, validated before any process group exists.

Only the flags megagrow acts on are defined; each keeps Megatron-LM's name, default and meaning.
`validate_args` turns every inconsistency into one `ArgumentError` line, so a bad launch fails in
seconds with a message rather than in a collective minutes later.
"""

from __future__ import annotations

import argparse
import math
import os

from megagrow.data.tokenizer import add_tokenizer_args
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
    g.add_argument("--use-rotary-position-embeddings", action="store_true",
                   help="deprecated (Megatron-LM still accepts it): = --position-embedding-type rope")
    g.add_argument("--no-position-embedding", action="store_false", dest="add_position_embedding",
                   help="deprecated (Megatron-LM still accepts it): only with rope, where it changes nothing")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--use-rope-scaling", action="store_true", help="Llama-3.1's RoPE frequency scaling")
    g.add_argument("--rope-scaling-factor", type=float, default=8.0, help="Llama-3.1's RoPE scaling factor")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, dest="layernorm_epsilon")  # Megatron-LM's dest
    g.add_argument("--apply-layernorm-1p", action="store_true", dest="layernorm_zero_centered_gamma",
                   help="norms scale by 1 + weight (weights start at 0)")  # Megatron-LM 0.16+'s dest
    g.add_argument("--qk-layernorm", action="store_true",
                   help="a --normalization norm on each head's queries and keys")
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="a bias on the QKV projection even with --disable-bias-linear (Qwen2)")
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
    g.add_argument("--train-iters", type=int, default=None, help="iterations to train (or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="samples to train: the run counts samples (its LR flags too: --lr-*-samples)")
    g.add_argument("--rampup-batch-size", nargs=3, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
                   help="grow the global batch from START by INCREMENT over SAMPLES samples (with --train-samples)")
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
    g.add_argument("--lr-decay-samples", type=int, default=None, help="default: --train-samples")
    g.add_argument("--decoupled-lr", type=float, default=None, help="the embedding's and output layer's own peak LR")
    g.add_argument("--decoupled-min-lr", type=float, default=None, help="... and its floor")
    g.add_argument("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"],
                   default="exponential", help="WSD: the shape of the final decay")
    g.add_argument("--lr-wsd-decay-iters", type=int, default=None, help="WSD: iterations of the final decay")
    g.add_argument("--lr-wsd-decay-samples", type=int, default=None, help="WSD: samples of the final decay")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-warmup-samples", type=int, default=0)
    g.add_argument("--lr-warmup-fraction", type=float, default=None, help="warmup as a fraction of the decay")
    g.add_argument("--exit-duration-in-mins", type=int, default=None,
                   help="save and exit once training has run this long (before the allocation ends)")
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
    g.add_argument("--freeze-layers", default=None, metavar="SPEC",
                   help="train only the other layers: 1-based layer numbers and ranges (1-3,5), or none; frozen layers "
                        "stay bit-identical and keep their optimizer state (embeddings and output layer train)")
    g.add_argument("--restart-lr-schedule-at", type=int, default=None,
                   help="when the loaded checkpoint is at this iteration, start the LR schedule afresh from these "
                        "flags (re-warm at a stage boundary) instead of the checkpoint's")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved 1F1B: each pipeline rank holds several model chunks of this many layers")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="interleaved 1F1B: model chunks per pipeline rank")
    g.add_argument("--no-overlap-p2p-communication", action="store_false", dest="overlap_p2p_comm",
                   help="interleaved schedule: batched, not overlapped, pipeline sends and receives")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="split the sequence across ranks in attention (Transformer Engine's attention)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with CUDA, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="how long a collective may wait before the job fails")


def _add_performance_args(p: argparse.ArgumentParser) -> None:
    """Speed and memory (Megatron-LM's names and defaults), handed to megatron-core's TransformerConfig and
    DistributedDataParallelConfig. A plan's `training:` may set them for every stage."""
    g = p.add_argument_group("performance")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split norms, dropout and residuals over the sequence across TP ranks (off at TP=1)")
    g.add_argument("--recompute-activations", action="store_true", help="= --recompute-granularity selective")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: recompute whole layers (with --recompute-method, --recompute-num-layers); "
                        "selective: the submodules of --recompute-modules (core attention by default)")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None)
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="+", default=None,
                   help="selective recompute: core_attn, mlp, layernorm, ... (megatron-core's names)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradient buckets during the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="distributed optimizer: gather parameter buckets during the next forward pass "
                        "(needs --overlap-grad-reduce)")
    g.add_argument("--no-align-param-gather", action="store_false", dest="align_param_gather")
    g.add_argument("--grad-reduce-in-bf16", action="store_true", help="bf16: reduce gradients in bf16, not fp32")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="gradient bucket elements with --overlap-grad-reduce (default max(40M, 1M x DP))")
    g.add_argument("--ddp-average-in-collective", action="store_true")
    g.add_argument("--calculate-per-token-loss", action="store_true",
                   help="scale gradients by the global batch's token count, not per microbatch")
    g.add_argument("--attention-backend", choices=["flash", "fused", "unfused", "local", "auto"], default="auto",
                   help="flash and fused are Transformer Engine's; auto lets it choose (local layers: unfused)")
    g.add_argument("--use-flash-attn", action="store_true", help="= --attention-backend flash")
    g.add_argument("--attention-softmax-in-fp32", action="store_true")
    g.add_argument("--no-masked-softmax-fusion", action="store_false", dest="masked_softmax_fusion")
    g.add_argument("--no-gradient-accumulation-fusion", action="store_false", dest="gradient_accumulation_fusion")
    g.add_argument("--cross-entropy-loss-fusion", action="store_true")
    g.add_argument("--cross-entropy-fusion-impl", choices=["native", "te"], default="native")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None, dest="fp8",
                   help="fp8 layers (Transformer Engine on a CUDA GPU)")
    g.add_argument("--fp8-amax-history-len", type=int, default=1)
    g.add_argument("--fp8-amax-compute-algo", choices=["most_recent", "max"], default="most_recent")
    g.add_argument("--fp8-param-gather", action="store_true")
    g.add_argument("--manual-gc", action="store_true",
                   help="Python's garbage collector off, run every --manual-gc-interval iterations on every rank")
    g.add_argument("--manual-gc-interval", type=int, default=0)
    g.add_argument("--no-manual-gc-eval", action="store_false", dest="manual_gc_eval")
    g.add_argument("--empty-unused-memory-level", type=int, choices=[0, 1, 2], default=0,
                   help="release cached CUDA memory: 1 after each iteration, 2 also after evaluation")
    g.add_argument("--use-mcore-models", action="store_true", dest="deprecated_use_mcore_models",
                   help="accepted, as in Megatron-LM: megatron-core models are the only ones")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    """Megatron-LM's data and tokenizer flags (names, defaults and dests), handed to megatron-core's
    GPTDatasetConfig and BlendedMegatronDatasetBuilder (megagrow.data.datasets)."""
    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="prefix, or weight prefix weight prefix ...; divided into train, valid, test by --split")
    g.add_argument("--split", default=None,
                   help="train,valid,test weights of --data-path's documents (default 969, 30, 1 with --data-path)")
    for split in ("train", "valid", "test"):
        g.add_argument(f"--{split}-data-path", nargs="+", default=None,
                       help=f"the {split} split's own blend, as --data-path (instead of --data-path and --split)")
    g.add_argument("--mock-data", action="store_true",
                   help="megatron-core's MockGPTDataset: generated documents, no data files")
    g.add_argument("--data-cache-path", default=None,
                   help="where the dataset index caches go (default: beside the data)")
    g.add_argument("--no-mmap-bin-files", action="store_false", dest="mmap_bin_files",
                   help="read the .bin files instead of mapping them into memory")
    g.add_argument("--no-create-attention-mask-in-dataloader", action="store_false",
                   dest="create_attention_mask_in_dataloader",
                   help="samples carry no attention mask (the attention builds the causal one itself)")
    g.add_argument("--num-workers", type=int, default=2,
                   help="DataLoader worker processes per rank (0: read in-process)")
    add_tokenizer_args(g)


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
    g.add_argument("--no-load-optim", action="store_true", default=None)
    g.add_argument("--no-load-rng", action="store_true", default=None)
    g.add_argument("--finetune", action="store_true", help="load weights only; iteration starts at 0")
    g.add_argument("--no-save-optim", action="store_true", default=None, help="save the model without the optimizer")
    g.add_argument("--no-save-rng", action="store_true", default=None)
    g.add_argument("--no-ckpt-fully-parallel-save", action="store_false", dest="ckpt_fully_parallel_save",
                   help="torch_dist: every tensor written by its first owner, not spread over data-parallel ranks")
    g.add_argument("--ckpt-fully-parallel-load", action="store_true",
                   help="torch_dist: data-parallel ranks read a share each and exchange the rest")
    g.add_argument("--ckpt-assume-constant-structure", action="store_true",
                   help="torch_dist: reuse the first save's plan of who writes what")
    g.add_argument("--dist-ckpt-strictness", default="assume_ok_unexpected",
                   choices=["assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
                            "return_unexpected", "return_all", "ignore_all"],
                   help="torch_dist load: what keys the checkpoint has and the model lacks (or the reverse) do")


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--metrics-file", default=None,
                   help="megagrow: append one JSON line per iteration and evaluation (full-precision losses)")
    g.add_argument("--log-throughput", action="store_true", help="TFLOP/s per GPU in the log line")
    g.add_argument("--log-params-norm", action="store_true", help="the parameters' L2 norm in the log line")
    g.add_argument("--log-num-zeros-in-grad", action="store_true", help="zero gradient elements in the log line")
    g.add_argument("--timing-log-level", type=int, choices=[0, 1, 2], default=0,
                   help="megatron-core timers: 1 forward-backward and optimizer, 2 also compute and p2p")
    g.add_argument("--timing-log-option", choices=["max", "minmax", "all"], default="minmax")
    g.add_argument("--log-timers-to-tensorboard", action="store_true")
    g.add_argument("--profile", action="store_true",
                   help="profile iterations --profile-step-start..end (nsys on CUDA, or --use-pytorch-profiler)")
    g.add_argument("--use-pytorch-profiler", action="store_true",
                   help="with --profile: torch.profiler traces into --tensorboard-dir")
    g.add_argument("--profile-step-start", type=int, default=10)
    g.add_argument("--profile-step-end", type=int, default=12)
    g.add_argument("--profile-ranks", type=int, nargs="+", default=[], help="default: every rank")
    g.add_argument("--wandb-project", default=None, help="log to Weights & Biases (the optional `wandb` package)")
    g.add_argument("--wandb-exp-name", default=None)
    g.add_argument("--wandb-save-dir", default=None)
    g.add_argument("--wandb-entity", default=None)


def megatron_lm_flags() -> set[str]:
    """Megatron-LM's own option strings (both releases megagrow follows)."""
    path = os.path.join(os.path.dirname(__file__), "megatron_lm_flags.txt")
    with open(path) as f:
        return {line.strip() for line in f if line.startswith("--")}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A flag argparse cannot read is one line too (argparse would print its whole usage, exit 2)."""
        raise ArgumentError(f"{message} (pretrain_gpt.py --help lists the flags)")

    def parse_args(self, args=None, namespace=None):
        """As argparse, but a Megatron-LM flag megagrow does not act on is named as such, never dropped."""
        namespace, extra = self.parse_known_args(args, namespace)
        if extra:
            flags = [x.split("=", 1)[0] for x in extra if x.startswith("--")]
            known = megatron_lm_flags()
            theirs = [f for f in flags if f in known]
            unknown = [f for f in flags if f not in known] or ([] if flags else extra)
            problems = ([f"{', '.join(theirs)}: Megatron-LM flag{'s' if len(theirs) > 1 else ''} megagrow does "
                         "not act on yet (docs/megatron-lm-flags.md)"] if theirs else [])
            problems += [f"unrecognized arguments: {' '.join(unknown)} (pretrain_gpt.py --help lists the flags)"
                         ] if unknown else []
            raise ArgumentError("; ".join(problems))
        return namespace


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(description="megagrow GPT pre-training (Megatron-LM flags)", allow_abbrev=False)
    for add in (_add_model_args, _add_training_args, _add_parallel_args, _add_performance_args, _add_data_args,
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
                "--lr-wsd-decay-samples", "--exit-interval", "--train-samples", "--lr-decay-samples", "--tensor-model-parallel-size",
                "--pipeline-model-parallel-size", "--log-interval", "--eval-interval", "--save-interval",
                "--make-vocab-size-divisible-by", "--vocab-size", "--rotary-base", "--recompute-num-layers",
                "--ddp-bucket-size", "--context-parallel-size", "--num-layers-per-virtual-pipeline-stage",
                "--num-virtual-stages-per-pipeline-rank", "--fp8-amax-history-len",
                "--distributed-timeout-minutes"),
            0: ("--manual-gc-interval", "--lr-warmup-samples", "--exit-duration-in-mins", "--eval-iters", "--lr-warmup-iters", "--vocab-extra-ids", "--num-workers", "--restart-lr-schedule-at", "--seed")}
# Real-valued flags: finite and inside an interval, written as in the message.
RANGES = {"--lr": "[0, inf)", "--min-lr": "[0, inf)", "--lr-warmup-init": "[0, inf)", "--weight-decay": "[0, inf)",
          "--clip-grad": "[0, inf)", "--adam-eps": "[0, inf)", "--adam-beta1": "[0, 1)", "--adam-beta2": "[0, 1)",
          "--hidden-dropout": "[0, 1]", "--attention-dropout": "[0, 1]", "--init-method-std": "[0, inf)",
          "--norm-epsilon": "[0, inf)", "--rotary-percent": "(0, 1]", "--rope-scaling-factor": "(0, inf)",
          "--decoupled-lr": "[0, inf)", "--decoupled-min-lr": "[0, inf)", "--lr-warmup-fraction": "[0, 1)"}
# Where a run writes, and what each must be: checked before anything is written.
OUTPUTS = {"--save": "directory", "--tensorboard-dir": "directory", "--data-cache-path": "directory",
           "--metrics-file": "file", "--stage-decision-file": "file"}
READ_ONLY_OK = ("--data-cache-path",)  # an index cache that exists is only read


def _dest(flag: str) -> str:
    return {"--norm-epsilon": "layernorm_epsilon"}.get(flag, flag[2:].replace("-", "_"))


def _check_model_variants(a: argparse.Namespace) -> None:
    """Megatron-LM's handling of the deprecated position flags and of the bias and norm variants."""
    if a.use_rotary_position_embeddings:
        a.position_embedding_type = "rope"
    _require(a.add_position_embedding or a.position_embedding_type == "rope",
             "--no-position-embedding: only with --position-embedding-type rope (it is deprecated; use "
             "--position-embedding-type)")
    _require(not a.use_rope_scaling or a.position_embedding_type == "rope",
             f"--use-rope-scaling: needs --position-embedding-type rope (it is {a.position_embedding_type})")
    if a.add_bias_linear:
        a.add_qkv_bias = True  # as Megatron-LM: the QKV bias is one of every linear's
    a.apply_layernorm_1p = a.layernorm_zero_centered_gamma  # the name Megatron-LM <= 0.15 saved (0.16 still reads it)


def _check_ranges(args: argparse.Namespace) -> None:
    for least, flags in AT_LEAST.items():
        for flag in flags:
            value = getattr(args, _dest(flag))
            _require(value is None or value >= least, f"{flag} {value}: must be {'positive' if least else '0 or more'}")
    for flag, spec in RANGES.items():
        value = getattr(args, _dest(flag))
        if value is None:
            continue
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


def _check_run_length(a: argparse.Namespace) -> None:
    """Megatron-LM's rules: a run counts iterations or samples, and its LR flags count the same."""
    from megagrow.training.schedule import iterations_for_samples, ramp_problem
    _require((a.train_iters is None) != (a.train_samples is None),
             "give one of --train-iters and --train-samples" if a.train_iters is None else
             "--train-iters and --train-samples are mutually exclusive")
    in_samples = a.train_samples is not None
    other = ("--lr-decay-iters", "--lr-warmup-iters") if in_samples else (
        "--lr-decay-samples", "--lr-warmup-samples", "--rampup-batch-size")
    for flag in other:
        value = getattr(a, _dest(flag))
        _require(value in (None, 0), f"{flag} {value if not isinstance(value, list) else ' '.join(value)}: "
                 f"only with {'--train-iters' if in_samples else '--train-samples'} (this run counts "
                 f"{'samples' if in_samples else 'iterations'}, as --{'train-samples' if in_samples else 'train-iters'} does)")
    if a.lr_warmup_fraction is not None:
        flag = "--lr-warmup-samples" if in_samples else "--lr-warmup-iters"
        _require(not getattr(a, _dest(flag)), f"--lr-warmup-fraction and {flag} are mutually exclusive")
        _require(0 <= a.lr_warmup_fraction < 1, f"--lr-warmup-fraction {a.lr_warmup_fraction}: must be in [0, 1)")
    if a.rampup_batch_size:
        problem = ramp_problem(a)
        _require(problem is None, problem)
    if in_samples:
        a.train_iters = iterations_for_samples(a)  # as Megatron-LM: what the loop and the log count
        _require(a.train_iters >= 1, f"--train-samples {a.train_samples} is less than one global batch "
                                     f"({a.global_batch_size})")


def _check_schedule(a: argparse.Namespace) -> None:
    """What megatron-core's OptimizerParamScheduler asserts, said beforehand in Megatron-LM's flag names."""
    from megagrow.training.schedule import scheduler_steps
    _check_run_length(a)
    steps = scheduler_steps(a)
    if a.train_samples is None:
        decay, name = (a.lr_decay_iters, "--lr-decay-iters") if a.lr_decay_iters else (a.train_iters, "--train-iters")
        unit, scale = "iterations", a.global_batch_size
    else:
        decay, name = (a.lr_decay_samples, "--lr-decay-samples") if a.lr_decay_samples else (a.train_samples,
                                                                                             "--train-samples")
        unit, scale = "samples", 1
    _require(a.lr >= a.min_lr, f"--lr {a.lr:g} is below --min-lr {a.min_lr:g}")
    _require(a.lr_warmup_init <= a.lr, f"--lr-warmup-init {a.lr_warmup_init:g} exceeds --lr {a.lr:g}")
    if a.decoupled_lr is not None:
        _require(a.decoupled_lr >= (a.decoupled_min_lr if a.decoupled_min_lr is not None else a.min_lr),
                 f"--decoupled-lr {a.decoupled_lr:g} is below its floor (--decoupled-min-lr, else --min-lr)")
    else:
        _require(a.decoupled_min_lr is None, "--decoupled-min-lr needs --decoupled-lr")
    warmup = (f"--lr-warmup-fraction {a.lr_warmup_fraction:g}" if a.lr_warmup_fraction is not None else
              f"--lr-warmup-iters {a.lr_warmup_iters}" if unit == "iterations" else
              f"--lr-warmup-samples {a.lr_warmup_samples}")
    _require(steps["lr_warmup_steps"] < steps["lr_decay_steps"],
             f"{warmup} must be below {name} {decay} (the LR decays over those {unit}, after its warmup)")
    if a.lr_decay_style != "WSD":
        return
    _require(a.lr_wsd_decay_iters is not None or a.lr_wsd_decay_samples is not None,
             "--lr-decay-style WSD needs --lr-wsd-decay-iters or --lr-wsd-decay-samples (its final decay)")
    if a.lr_wsd_decay_iters is not None:
        _require(unit == "iterations", f"--lr-wsd-decay-iters {a.lr_wsd_decay_iters}: only with --train-iters "
                                       "(this run counts samples: give --lr-wsd-decay-samples)")
        _require(a.lr_wsd_decay_iters <= decay, f"--lr-wsd-decay-iters {a.lr_wsd_decay_iters} exceeds {name} {decay} "
                                                "(the final decay is their last part)")
    else:
        _require(a.lr_wsd_decay_samples <= decay * scale,
                 f"--lr-wsd-decay-samples {a.lr_wsd_decay_samples} exceeds {name} {decay}"
                 + (f" x --global-batch-size {a.global_batch_size}" if scale > 1 else "")
                 + " (the final decay is their last part)")


def _transformer_engine_available() -> bool:
    import importlib.util
    import torch
    return importlib.util.find_spec("transformer_engine") is not None and torch.cuda.is_available()


TE_NEEDED = "needs Transformer Engine on a CUDA GPU (--transformer-impl transformer_engine)"


def _refusals_for_this_machine(a: argparse.Namespace) -> list[str]:
    """Flags whose feature this machine cannot run, each named with what it needs."""
    te = a.transformer_impl != "local" and _transformer_engine_available()
    if a.transformer_impl == "transformer_engine" and not te:
        return ["--transformer-impl transformer_engine: needs Transformer Engine installed and a CUDA GPU"]
    if te:
        return []
    wanted = {"--fp8-format": a.fp8, "--fp8-param-gather": a.fp8_param_gather,
              "--fp8-amax-history-len": a.fp8_amax_history_len if a.fp8_amax_history_len != 1 else None,
              "--fp8-amax-compute-algo": a.fp8_amax_compute_algo if a.fp8_amax_compute_algo != "most_recent" else None,
              "--use-flash-attn": a.use_flash_attn,
              "--attention-backend": a.attention_backend if a.attention_backend in ("flash", "fused") else None,
              "--cross-entropy-fusion-impl": "te" if a.cross_entropy_fusion_impl == "te" else None}
    return [f"{flag}{'' if value is True else f' {value}'}: {TE_NEEDED}" for flag, value in wanted.items() if value]


def _check_performance(a: argparse.Namespace) -> None:
    """Megatron-LM's rules for the speed and memory flags, said in its flag names before megatron-core asserts."""
    if a.recompute_activations:
        a.recompute_granularity = "selective"
    if a.use_flash_attn:
        a.attention_backend = "flash"
    g = a.recompute_granularity
    per_stage = a.num_layers // a.pipeline_model_parallel_size // (a.virtual_pipeline_model_parallel_size or 1)
    if g == "full":
        _require(a.recompute_method is not None and a.recompute_num_layers is not None,
                 "--recompute-granularity full needs --recompute-method (uniform or block) and --recompute-num-layers")
        _require(a.recompute_num_layers <= per_stage,
                 f"--recompute-num-layers {a.recompute_num_layers} exceeds the {per_stage} layers of a model chunk")
    else:
        for flag, value in (("--recompute-method", a.recompute_method), ("--recompute-num-layers",
                                                                          a.recompute_num_layers)):
            _require(value is None, f"{flag} {value}: only with --recompute-granularity full"
                                    + (f" (it is {g})" if g else ""))
    _require(a.recompute_modules is None or g == "selective",
             "--recompute-modules: only with --recompute-granularity selective (or --recompute-activations)")
    _require(not a.overlap_param_gather or (a.use_distributed_optimizer and a.overlap_grad_reduce),
             "--overlap-param-gather needs --use-distributed-optimizer and --overlap-grad-reduce")
    _require(not a.grad_reduce_in_bf16 or a.bf16, "--grad-reduce-in-bf16 needs --bf16")
    if a.tensor_model_parallel_size == 1:
        a.sequence_parallel = False  # as Megatron-LM: nothing to split at TP=1, and the same numbers
    if a.virtual_pipeline_model_parallel_size is None:
        a.align_param_gather = False  # as Megatron-LM without the interleaved schedule: nothing to align
    _require(a.context_parallel_size == 1,
             f"--context-parallel-size {a.context_parallel_size}: not supported by megagrow yet (its data loader "
             "does not split sequences across context-parallel ranks)")
    refused = _refusals_for_this_machine(a)
    _require(not refused, "; ".join(refused))


def _check_virtual_pipeline(a: argparse.Namespace) -> None:
    """Megatron-LM's virtual pipeline: virtual_pipeline_model_parallel_size chunks per pipeline rank (None: one)."""
    per_layers, per_rank = a.num_layers_per_virtual_pipeline_stage, a.num_virtual_stages_per_pipeline_rank
    _require(per_layers is None or per_rank is None, "--num-layers-per-virtual-pipeline-stage and "
             "--num-virtual-stages-per-pipeline-rank are mutually exclusive")
    stage_layers = a.num_layers // a.pipeline_model_parallel_size
    if per_layers is not None:
        _require(stage_layers % per_layers == 0, f"--num-layers-per-virtual-pipeline-stage {per_layers} does not "
                 f"divide the {stage_layers} layers of a pipeline stage")
        per_rank = stage_layers // per_layers
    if per_rank is not None:
        _require(stage_layers % per_rank == 0, f"--num-virtual-stages-per-pipeline-rank {per_rank} does not "
                 f"divide the {stage_layers} layers of a pipeline stage")
    a.virtual_pipeline_model_parallel_size = per_rank if per_rank and per_rank > 1 else None
    if a.virtual_pipeline_model_parallel_size is None:
        a.overlap_p2p_comm = False  # as Megatron-LM: nothing to overlap without the interleaved schedule
        return
    least = 2 if a.overlap_p2p_comm else 3
    _require(a.pipeline_model_parallel_size >= least,
             f"a virtual pipeline needs --pipeline-model-parallel-size {least} or more"
             + ("" if a.overlap_p2p_comm else " with --no-overlap-p2p-communication"))


def _check_logging(a: argparse.Namespace) -> None:
    import importlib.util
    import torch
    if a.profile:
        _require(a.use_pytorch_profiler or torch.cuda.is_available(),
                 "--profile: needs a CUDA GPU (an nsys capture range); add --use-pytorch-profiler for torch.profiler traces")
        _require(not a.use_pytorch_profiler or a.tensorboard_dir,
                 "--use-pytorch-profiler: needs --tensorboard-dir (where its traces go)")
        _require(0 <= a.profile_step_start < a.profile_step_end,
                 f"--profile-step-start {a.profile_step_start} must be below --profile-step-end {a.profile_step_end}")
    if a.wandb_project:
        _require(importlib.util.find_spec("wandb") is not None,
                 "--wandb-project: needs the wandb package (pip install wandb; WANDB_MODE=offline stays local)")
        _require(a.wandb_save_dir or a.save, "--wandb-project: needs --wandb-save-dir or --save (SAVE/wandb)")


def _data_prefixes(data_path: list[str], flag: str = "--data-path") -> list[str]:
    """Megatron-LM's --data-path (and --train-data-path, ...): `prefix ...`, or a blend `weight prefix weight
    prefix ...`; each prefix's .bin and .idx exist."""
    from megagrow.data.indexed import blend
    parsed = blend(data_path)
    _require(parsed is not None,
             f"{flag} {' '.join(data_path)}: expected prefixes, or weights and prefixes in turn "
             "(weight prefix weight prefix ...)")
    weights, prefixes = parsed
    for w in weights or []:
        _require(math.isfinite(w) and w > 0, f"{flag}: weight {w:g} must be positive")
    for prefix in prefixes:
        _require(os.path.isfile(prefix + ".bin") and os.path.isfile(prefix + ".idx"),
                 f"data path not found: {prefix} (expected {prefix}.bin and {prefix}.idx)")
    return prefixes


PER_SPLIT = ("--train-data-path", "--valid-data-path", "--test-data-path")


def _check_data(args: argparse.Namespace) -> None:
    """One source of data, as Megatron-LM asks: --data-path divided by --split, a blend per split, or --mock-data."""
    from megagrow.data.indexed import check_split, sequence_lengths, split_matrix
    per_split = {flag: getattr(args, _dest(flag)) for flag in PER_SPLIT}
    sources = [name for name, given in (("--mock-data", args.mock_data), ("--data-path", bool(args.data_path)),
                                        ("/".join(PER_SPLIT), any(per_split.values()))) if given]
    _require(len(sources) <= 1, f"{' and '.join(sources)}: give one source of data, not both")
    _require(bool(sources), "--data-path is required (or --train-data-path and --valid-data-path, or --mock-data)")
    if args.data_path and args.split is None:
        args.split = "969, 30, 1"  # Megatron-LM's default with --data-path (it warns that it is a legacy value)
    if any(per_split.values()):
        _require(args.split is None, f"--split {args.split}: only with --data-path or --mock-data (each of "
                                     f"{', '.join(PER_SPLIT)} is a whole split)")
        _require(bool(args.train_data_path), "--train-data-path is required with --valid-data-path or --test-data-path")
        _require(bool(args.valid_data_path) or not args.eval_iters,
                 "--valid-data-path is required to evaluate (or pass --eval-iters 0)")
        for flag, paths in per_split.items():
            for prefix in _data_prefixes(paths or [], flag):
                _require(int(sequence_lengths(prefix).sum()) > 0, f"{flag}: {prefix} holds no tokens")
        return
    prefixes = _data_prefixes(args.data_path) if args.data_path else []
    if args.split is None:
        return  # --mock-data: megatron-core divides its documents evenly
    train, valid, _ = split_matrix(args.split)
    _require(train is not None, f"--split {args.split} leaves no training split")
    _require(valid is not None or not args.eval_iters,
             f"--split {args.split} leaves no validation split to evaluate on (pass --eval-iters 0)")
    for prefix in prefixes:
        check_split(prefix, args.split)  # the index and the .bin agree, and every split gets tokens


def _check_tokenizer(args: argparse.Namespace) -> None:
    """The tokenizer is built here (its files read, its package imported), so that a bad one is the same line on
    every rank before any process group exists; megagrow.data.tokenizer says what is wrong with it."""
    from megagrow.data.tokenizer import build_tokenizer, tokenizer_flags
    flags = tokenizer_flags(args)
    args.tokenizer_type = flags["tokenizer_type"]
    try:
        build_tokenizer(**flags)
    except MegagrowError as e:
        raise ArgumentError(str(e)) from None


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

    _check_model_variants(args)
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
    _check_virtual_pipeline(args)
    if args.freeze_layers is not None:
        from megagrow.training.freezing import parse_layers
        try:
            parse_layers(args.freeze_layers, args.num_layers)
        except ValueError as e:
            raise ArgumentError(f"--freeze-layers {args.freeze_layers}: {e}") from None
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
    _check_performance(args)
    _check_logging(args)

    _require(not (args.bf16 and args.fp16), "--bf16 and --fp16 are mutually exclusive")
    _require(not (args.override_opt_param_scheduler and args.use_checkpoint_opt_param_scheduler),
             "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler are mutually exclusive")
    _require(not (args.ckpt_format == "torch" and args.virtual_pipeline_model_parallel_size),
             "--ckpt-format torch with a virtual pipeline is not supported by megagrow yet (use torch_dist)")
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
