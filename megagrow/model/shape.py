"""A GPT model's shape with Megatron-LM's defaults and derived values, and what follows from it
(parameter count, FLOPs per iteration): the one place these are computed.

A shape is built from the trainer's flags or a checkpoint's args (`from_args`, Megatron-LM arg
names), or from a plan's flag dict (`from_flags`, Megatron-LM flag names: `disable_bias_linear`),
and rendered back to either (`as_args`, `to_flags`).
"""

from __future__ import annotations

import argparse
import math
from dataclasses import asdict, dataclass, fields, replace


WIDTH_FIELDS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp_size: int) -> int:
    """Megatron-LM pads the vocabulary to a multiple of divisible_by x TP."""
    multiple = divisible_by * tp_size
    return -(-vocab_size // multiple) * multiple


def default_ffn_hidden_size(hidden_size: int, swiglu: bool) -> int:
    """Megatron-LM's: 4h, or for SwiGLU 2/3 of it (the same parameter count) rounded down to 64."""
    return int(4 * hidden_size * 2 / 3 / 64) * 64 if swiglu else 4 * hidden_size


def kv_channels(args) -> int:
    """The head size: --kv-channels, else hidden / heads (Megatron-LM's default)."""
    return getattr(args, "kv_channels", None) or args.hidden_size // args.num_attention_heads


def query_groups(args) -> int:
    """Key/value heads: --num-query-groups under --group-query-attention, else one per head."""
    if getattr(args, "group_query_attention", False) and getattr(args, "num_query_groups", None):
        return args.num_query_groups
    return args.num_attention_heads


def shape_problems(args, tp: int, pp: int) -> list[str]:
    """Why a model with these args cannot be split at TP x PP (what megatron-core would refuse), or []."""
    sizes = {"--num-layers": args.num_layers, "--hidden-size": args.hidden_size,
             "--ffn-hidden-size": args.ffn_hidden_size, "--num-attention-heads": args.num_attention_heads,
             "--num-query-groups": query_groups(args)}
    bad = [f"{flag} {value} must be positive" for flag, value in sizes.items() if not value or value < 1]
    if bad:
        return bad
    heads, groups = args.num_attention_heads, query_groups(args)
    divisible = [(args.hidden_size, "--hidden-size", heads, "--num-attention-heads",
                  getattr(args, "kv_channels", None) is None),
                 (heads, "--num-attention-heads", groups, "--num-query-groups", True),
                 (heads, "--num-attention-heads", tp, "tensor parallel size", True),
                 (groups, "--num-query-groups", tp, "tensor parallel size", True),
                 (args.ffn_hidden_size, "--ffn-hidden-size", tp, "tensor parallel size", True),
                 (getattr(args, "padded_vocab_size", None) or tp, "padded vocabulary", tp, "tensor parallel size",
                  True)]
    problems = [f"{name} {n} is not divisible by {by_name} {by}" for n, name, by, by_name, needed in divisible
                if needed and n % by]
    uneven = getattr(args, "decoder_first_pipeline_num_layers", None) is not None or \
        getattr(args, "decoder_last_pipeline_num_layers", None) is not None
    if pp > args.num_layers or (args.num_layers % pp and not uneven):
        problems.append(f"{args.num_layers} layers do not split into {pp} equal pipeline stages")
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    if vpp and (pp < 2 or (args.num_layers // pp) % vpp):
        problems.append(f"{args.num_layers} layers at PP={pp} do not split into {vpp} model chunks per pipeline rank"
                        + (" (a virtual pipeline needs PP 2 or more)" if pp < 2 else ""))
    return problems


def gated(args) -> bool:
    return bool(getattr(args, "swiglu", False))


def qkv_bias(args) -> bool:
    """linear_qkv has a bias: with every linear's (Megatron-LM's default) or alone (--add-qkv-bias, Qwen2)."""
    return bool(getattr(args, "add_bias_linear", True) or getattr(args, "add_qkv_bias", False))


def zero_centered_gamma(args) -> bool:
    """--apply-layernorm-1p: norms scale by 1 + weight. Megatron-LM <= 0.15 saved it as apply_layernorm_1p,
    0.16+ under TransformerConfig's name."""
    return bool(getattr(args, "layernorm_zero_centered_gamma", False) or getattr(args, "apply_layernorm_1p", False))


def tied(args) -> bool:
    return not getattr(args, "untie_embeddings_and_output_weights", False)


def expected_shapes(args) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """(global tensor shapes, per-layer tensor shapes) of a GPT model with these args."""
    h, ffn, d = args.hidden_size, args.ffn_hidden_size, kv_channels(args)
    heads, groups = args.num_attention_heads, query_groups(args)
    bias = getattr(args, "add_bias_linear", True)
    layer_norm = getattr(args, "normalization", "LayerNorm") == "LayerNorm"
    fc1_rows = 2 * ffn if gated(args) else ffn
    layer = {"self_attention.linear_qkv.layer_norm_weight": (h,),
             "self_attention.linear_qkv.weight": ((heads + 2 * groups) * d, h),
             "self_attention.linear_proj.weight": (h, heads * d),
             "mlp.linear_fc1.layer_norm_weight": (h,),
             "mlp.linear_fc1.weight": (fc1_rows, h),
             "mlp.linear_fc2.weight": (h, ffn)}
    if layer_norm:
        layer["self_attention.linear_qkv.layer_norm_bias"] = (h,)
        layer["mlp.linear_fc1.layer_norm_bias"] = (h,)
    if getattr(args, "qk_layernorm", False):  # one norm over the head dim, shared by all heads (replicated over TP)
        for norm in ("q_layernorm", "k_layernorm"):
            layer[f"self_attention.{norm}.weight"] = (d,)
            if layer_norm:
                layer[f"self_attention.{norm}.bias"] = (d,)
    if qkv_bias(args):
        layer["self_attention.linear_qkv.bias"] = ((heads + 2 * groups) * d,)
    if bias:
        layer.update({"self_attention.linear_proj.bias": (h,), "mlp.linear_fc1.bias": (fc1_rows,),
                      "mlp.linear_fc2.bias": (h,)})
    vocab = args.padded_vocab_size
    glob = {"embedding.word_embeddings.weight": (vocab, h), "decoder.final_layernorm.weight": (h,)}
    if layer_norm:
        glob["decoder.final_layernorm.bias"] = (h,)
    if getattr(args, "position_embedding_type", "learned_absolute") == "learned_absolute":
        glob["embedding.position_embeddings.weight"] = (args.max_position_embeddings, h)
    if not tied(args):
        glob["output_layer.weight"] = (vocab, h)
    return glob, layer


@dataclass(frozen=True)
class ModelShape:
    num_layers: int
    """Transformer layers."""
    hidden_size: int
    """Width of the residual stream."""
    num_attention_heads: int
    """Query heads."""
    ffn_hidden_size: int | None = None
    """MLP width; None: Megatron-LM's default (default_ffn_hidden_size)."""
    num_query_groups: int | None = None
    """Key/value heads; None (or no group_query_attention): one per query head."""
    group_query_attention: bool = False
    """Whether num_query_groups applies."""
    kv_channels: int | None = None
    """Head size; None: hidden_size // num_attention_heads."""
    swiglu: bool = False
    """Gated MLP (linear_fc1 holds gate and up rows)."""
    normalization: str = "LayerNorm"
    """LayerNorm (weight and bias) or RMSNorm (weight only)."""
    add_bias_linear: bool = True
    """Biases on the linear layers (Megatron-LM's flag: --disable-bias-linear turns them off)."""
    add_qkv_bias: bool = False
    """A bias on linear_qkv even without the other biases (--add-qkv-bias, Qwen2)."""
    qk_layernorm: bool = False
    """A norm (of --normalization's kind) on each head's queries and keys (--qk-layernorm)."""
    layernorm_zero_centered_gamma: bool = False
    """Norms scale by 1 + weight, weights start at 0 (--apply-layernorm-1p)."""
    untie_embeddings_and_output_weights: bool = False
    """A separate output layer instead of the word embedding."""
    position_embedding_type: str = "learned_absolute"
    """learned_absolute (a position embedding table) or rope."""
    seq_length: int | None = None
    """Tokens per sample (FLOPs depend on it)."""
    max_position_embeddings: int | None = None
    """Rows of the position table; None: seq_length."""
    vocab_size: int | None = None
    """The tokenizer's vocabulary, before padding."""
    make_vocab_size_divisible_by: int = 128
    """Padding unit of the vocabulary (times TP)."""

    def __post_init__(self):
        derived = {"ffn_hidden_size": self.ffn_hidden_size or default_ffn_hidden_size(self.hidden_size, self.swiglu),
                   "kv_channels": kv_channels(self), "num_query_groups": query_groups(self),
                   "max_position_embeddings": self.max_position_embeddings or self.seq_length}
        for name, value in derived.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_args(cls, args, **overrides) -> "ModelShape":
        """From a Namespace with Megatron-LM's arg names (the trainer's, or a checkpoint's saved args)."""
        values = {f.name: getattr(args, f.name) for f in fields(cls) if getattr(args, f.name, None) is not None}
        values["layernorm_zero_centered_gamma"] = zero_centered_gamma(args)
        if "vocab_size" not in values and getattr(args, "tokenizer_vocab_size", None):
            values["vocab_size"] = args.tokenizer_vocab_size
        if "vocab_size" not in values and getattr(args, "padded_vocab_size", None):
            values["vocab_size"] = args.padded_vocab_size  # Megatron-LM's args keep only the padded size
        return cls(**{**values, **overrides})

    @classmethod
    def from_flags(cls, flags: dict, **overrides) -> "ModelShape":
        """From a plan's dict keyed by Megatron-LM flag names; flags that are not shape fields are ignored."""
        values = {k: v for k, v in flags.items() if k in _FIELD_NAMES and v is not None}
        if flags.get("disable_bias_linear"):
            values["add_bias_linear"] = False
        if flags.get("apply_layernorm_1p"):
            values["layernorm_zero_centered_gamma"] = True
        if flags.get("use_rotary_position_embeddings"):  # Megatron-LM's deprecated spelling
            values["position_embedding_type"] = "rope"
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def with_sizes(self, **sizes) -> "ModelShape":
        """The same model with other sizes (None: unchanged); a new query-group count turns on GQA."""
        sizes = {k: v for k, v in sizes.items() if v is not None}
        if "num_query_groups" in sizes:
            sizes["group_query_attention"] = True
        elif not self.group_query_attention and "num_attention_heads" in sizes:
            sizes["num_query_groups"] = None  # one group per head again
        if "hidden_size" in sizes and "ffn_hidden_size" not in sizes and "kv_channels" not in sizes:
            sizes.setdefault("kv_channels", self.kv_channels)  # heads grow in number, not in size
        return replace(self, **sizes)

    def to_flags(self) -> dict:
        """The shape as a plan's flag dict (what differs from Megatron-LM's defaults, plus the sizes)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("seq_length", "vocab_size") or value == f.default and f.name not in _ALWAYS:
                continue
            if f.name == "add_bias_linear":
                out["disable_bias_linear"] = not value
            elif f.name == "layernorm_zero_centered_gamma":
                out["apply_layernorm_1p"] = value
            elif f.name == "add_qkv_bias" and self.add_bias_linear:
                continue  # implied by the other biases
            elif f.name == "num_query_groups" and not self.group_query_attention:
                continue
            else:
                out[f.name] = value
        return out

    def padded_vocab_size(self, tp: int = 1) -> int:
        return padded_vocab_size(self.vocab_size, self.make_vocab_size_divisible_by, tp)

    def as_args(self, tp: int = 1) -> argparse.Namespace:
        """The shape as trainer args (Megatron-LM's names), with the vocabulary padded for TP."""
        a = argparse.Namespace(**asdict(self))
        a.padded_vocab_size = self.padded_vocab_size(tp)
        a.tokenizer_vocab_size = self.vocab_size
        return a

    def parameters(self, tp: int = 1) -> int:
        return parameter_count(self.as_args(tp))

    def flops(self, batch_size: int) -> float:
        return num_floating_point_operations(self.as_args(), batch_size)


_FIELD_NAMES = {f.name for f in fields(ModelShape)}
_ALWAYS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size")


def parameter_count(args) -> int:
    glob, layer = expected_shapes(args)
    return sum(math.prod(s) for s in glob.values()) + args.num_layers * sum(math.prod(s) for s in layer.values())


def num_floating_point_operations(args, batch_size: int) -> float:
    """Model FLOPs of one forward+backward pass over `batch_size` sequences (Megatron-LM's formula).

    Per layer and token: QKV and output projections, attention scores, MLP (x3/2 for SwiGLU), and the
    logit layer once per token; x2 for multiply-add, x3 for forward plus backward.
    """
    kv_ratio = query_groups(args) / args.num_attention_heads
    q_ratio = kv_channels(args) * args.num_attention_heads / args.hidden_size
    gated = 1.5 if getattr(args, "swiglu", False) else 1.0
    h, L, s = args.hidden_size, args.num_layers, args.seq_length
    return 12 * batch_size * s * L * h * h * (
        (1 + kv_ratio + s / h) * q_ratio
        + args.ffn_hidden_size / h * gated
        + args.padded_vocab_size / (2 * L * h))
