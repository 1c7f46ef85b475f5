"""Hugging Face's Llama-family models against Megatron's layout: the one table both directions read.

Llama (1-3.x), Mistral, Qwen2/2.5 and Qwen3 share one tensor layout (`model.layers.N.self_attn.q_proj.weight`...)
and differ in config fields: Qwen2's QKV bias, Qwen3's per-head q/k norms and explicit head_dim, Llama-3's RoPE
scaling. Megatron fuses Q, K and V into one tensor whose rows are grouped per query group ([the group's q heads,
k, v]) and SwiGLU's gate and up projections into one [gate; up]. Both lay RoPE out as rotate-half (Megatron's
default, not --rotary-interleaved), so no rows are permuted. Unit names are the unsharded view's (layout.py).
"""

from __future__ import annotations

import argparse

import torch

from megagrow.errors import MegagrowError
from megagrow.model.layout import is_norm_weight
from megagrow.model.shape import gated, kv_channels, query_groups, qkv_bias, tied, zero_centered_gamma

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM"}
GLOBALS = {"embedding.word_embeddings.weight": "model.embed_tokens.weight",
           "decoder.final_layernorm.weight": "model.norm.weight", "output_layer.weight": "lm_head.weight"}
# A Megatron layer tensor -> the Hugging Face tensors it holds (several: fused, in Megatron's order).
LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight",
                                         "self_attn.v_proj.weight"),
    "self_attention.linear_qkv.bias": ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "self_attention.linear_proj.bias": ("self_attn.o_proj.bias",),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc1.bias": ("mlp.gate_proj.bias", "mlp.up_proj.bias"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    "mlp.linear_fc2.bias": ("mlp.down_proj.bias",),
}
# Llama-3's RoPE scaling as megatron-core computes it (only its factor is a flag).
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


class HFConfigError(MegagrowError):
    """A config.json megagrow cannot express as Megatron flags (names the field)."""


def layer_key(index: int, name: str) -> str:
    return f"model.layers.{index}.{name}"


def _qkv_split(args) -> list[int]:
    """Rows per query group in Megatron's fused QKV: the group's q heads, then one k and one v head."""
    d, heads, groups = kv_channels(args), args.num_attention_heads, query_groups(args)
    return [heads // groups * d, d, d]


def to_megatron(name: str, parts: list[torch.Tensor], args) -> torch.Tensor:
    """One Megatron tensor from the Hugging Face tensors LAYER names for it (in that order)."""
    if name.startswith("self_attention.linear_qkv.") and len(parts) == 3:
        groups = query_groups(args)
        grouped = [p.reshape(groups, -1, *p.shape[1:]) for p in parts]  # [groups, rows per group, (hidden)]
        return torch.cat(grouped, dim=1).reshape(-1, *parts[0].shape[1:])
    if len(parts) == 2:  # SwiGLU: [gate; up]
        return torch.cat(parts, dim=0)
    return parts[0]


def to_hf(name: str, tensor: torch.Tensor, args) -> list[torch.Tensor]:
    """The Hugging Face tensors of one Megatron tensor (the inverse of to_megatron)."""
    if name.startswith("self_attention.linear_qkv.") and not name.endswith("layer_norm_weight"):
        grouped = tensor.reshape(query_groups(args), -1, *tensor.shape[1:])
        return [p.reshape(-1, *tensor.shape[1:]) for p in grouped.split(_qkv_split(args), dim=1)]
    if name.startswith("mlp.linear_fc1.") and not name.endswith("layer_norm_weight"):
        return list(tensor.chunk(2, dim=0))
    return [tensor]


def hf_names(megatron_name: str, index: int | None = None) -> tuple[str, ...]:
    """Hugging Face names of a global (index None) or layer tensor."""
    if index is None:
        return (GLOBALS[megatron_name],)
    return tuple(layer_key(index, n) for n in LAYER[megatron_name])


def _refuse(field: str, value, why: str) -> None:
    raise HFConfigError(f"config.json: {field} {value!r}: {why}")


def _rope(config: dict) -> tuple[float, dict | None]:
    """(rope theta, scaling) from either spelling: rope_theta/rope_scaling (released models), rope_parameters
    (transformers 5)."""
    params = dict(config.get("rope_parameters") or {})
    scaling = config.get("rope_scaling") or params
    theta = config.get("rope_theta", params.get("rope_theta", 10000.0))
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    return theta, (None if kind == "default" else scaling)


def megatron_flags(config: dict) -> dict[str, object]:
    """Megatron-LM's flags (dest names) for a Hugging Face config.json; refuses, naming the field, what Megatron
    cannot express (sliding windows, MoE, other activations or RoPE scalings)."""
    family = config.get("model_type")
    if family not in FAMILIES:
        _refuse("model_type", family, f"not a family megagrow reads ({', '.join(FAMILIES)})")
    for field in ("num_experts", "num_local_experts", "n_routed_experts"):
        if config.get(field):
            _refuse(field, config[field], "mixture-of-experts models are not supported")
    if config.get("hidden_act", "silu") != "silu":
        _refuse("hidden_act", config["hidden_act"], "only SwiGLU (silu) MLPs map to Megatron's --swiglu")
    window = config.get("sliding_window")
    if (config.get("use_sliding_window", family == "mistral") and window is not None
            and window < config.get("max_position_embeddings", 0)):
        _refuse("sliding_window", window, "sliding-window attention is not supported")
    heads, hidden = config["num_attention_heads"], config["hidden_size"]
    groups = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    attention_bias, mlp_bias = bool(config.get("attention_bias", False)), bool(config.get("mlp_bias", False))
    if family == "qwen2":  # Qwen2's q/k/v carry biases whatever attention_bias says; o_proj and the MLP none
        attention_bias = None
    elif attention_bias != mlp_bias:
        _refuse("attention_bias", attention_bias, f"with mlp_bias {mlp_bias}: Megatron's linear biases are all or "
                "none (besides QKV)")
    theta, scaling = _rope(config)
    flags = {"num_layers": config["num_hidden_layers"], "hidden_size": hidden, "num_attention_heads": heads,
             "ffn_hidden_size": config["intermediate_size"], "group_query_attention": groups != heads,
             "num_query_groups": groups, "kv_channels": head_dim, "swiglu": True, "normalization": "RMSNorm",
             "layernorm_epsilon": config.get("rms_norm_eps", 1e-6), "position_embedding_type": "rope",
             "rotary_base": int(theta), "rotary_percent": float(config.get("partial_rotary_factor", 1.0)),
             "max_position_embeddings": config.get("max_position_embeddings", 4096),
             "untie_embeddings_and_output_weights": not config.get("tie_word_embeddings", False),
             "add_bias_linear": bool(attention_bias), "add_qkv_bias": attention_bias is None,
             "qk_layernorm": family == "qwen3", "use_rope_scaling": scaling is not None,
             "attention_dropout": float(config.get("attention_dropout", 0.0)), "hidden_dropout": 0.0,
             "init_method_std": config.get("initializer_range", 0.02), "vocab_size": config["vocab_size"]}
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind != "llama3":
            _refuse("rope_scaling.rope_type", kind, "only Llama-3's scaling is in megatron-core")
        for key, value in _LLAMA3_ROPE.items():
            if float(scaling.get(key, value)) != value:
                _refuse(f"rope_scaling.{key}", scaling[key], f"megatron-core's Llama-3 scaling fixes it at {value:g}")
        flags["rope_scaling_factor"] = float(scaling.get("factor", 8.0))
    dtype = config.get("dtype", config.get("torch_dtype", "float32"))
    flags.update(bf16=dtype == "bfloat16", fp16=dtype == "float16")
    return flags


def trainer_flags(config: dict) -> list[str]:
    """The model flags pretrain_gpt.py trains this model with (Megatron-LM's spelling)."""
    flags, argv = megatron_flags(config), []
    flags["disable_bias_linear"] = not flags.pop("add_bias_linear")
    if not flags["group_query_attention"]:
        del flags["num_query_groups"]
    for dest, value in flags.items():
        flag = "--norm-epsilon" if dest == "layernorm_epsilon" else "--" + dest.replace("_", "-")
        if dest == "vocab_size" or value is False:
            continue
        argv += [flag] if value is True else [flag, f"{value:g}" if isinstance(value, float) else str(value)]
    return argv


def megatron_args(config: dict, tokenizer_dir: str | None = None) -> argparse.Namespace:
    """The saved `args` a Megatron checkpoint of this model would carry (Megatron-LM's names, TP=PP=1)."""
    flags = megatron_flags(config)
    vocab = flags.pop("vocab_size")
    a = argparse.Namespace(**flags, seq_length=min(flags["max_position_embeddings"], 4096),
                           make_vocab_size_divisible_by=128, tensor_model_parallel_size=1,
                           pipeline_model_parallel_size=1, virtual_pipeline_model_parallel_size=None, world_size=1,
                           data_parallel_size=1, seed=1234, transformer_impl="local", add_position_embedding=True,
                           use_distributed_optimizer=False, ckpt_format="torch_dist", iteration=0,
                           consumed_train_samples=0, micro_batch_size=1, global_batch_size=1,
                           layernorm_zero_centered_gamma=False, tokenizer_vocab_size=vocab,
                           tokenizer_type="HuggingFaceTokenizer" if tokenizer_dir else None,
                           tokenizer_model=tokenizer_dir, hf_family=config["model_type"])
    a.padded_vocab_size = vocab  # the rows stored; a Megatron target pads them (checkpoint.view.vocab_rows)
    return a


def implied_family(args) -> str:
    """The Hugging Face family a Megatron model's shape is: Qwen3 with q/k norms, Qwen2 with a QKV bias alone,
    else Llama."""
    if getattr(args, "qk_layernorm", False):
        return "qwen3"
    if qkv_bias(args) and not getattr(args, "add_bias_linear", True):
        return "qwen2"
    return "llama"


def hf_config(args, family: str | None = None) -> dict:
    """config.json for a Megatron model as `family` (default: the family it was imported from, else
    implied_family); refuses what it cannot hold."""
    family = family or getattr(args, "hf_family", None) or implied_family(args)
    if family not in FAMILIES:
        raise HFConfigError(f"--hf-family {family}: not one of {', '.join(FAMILIES)}")
    problems = [(flag, ok) for flag, ok in (
        ("--normalization RMSNorm", getattr(args, "normalization", "LayerNorm") == "RMSNorm"),
        ("--swiglu", gated(args)),
        ("--position-embedding-type rope", getattr(args, "position_embedding_type", "") == "rope"),
        ("--rotary-percent 1.0", getattr(args, "rotary_percent", 1.0) == 1.0)) if not ok]
    bias, qkv, qk_norm = getattr(args, "add_bias_linear", True), qkv_bias(args), getattr(args, "qk_layernorm", False)
    if family == "qwen2" and not (qkv and not bias):
        problems.append(("--disable-bias-linear --add-qkv-bias (Qwen2's biases)", False))
    if family != "qwen2" and qkv and not bias:
        problems.append(("no QKV-only bias (that is --hf-family qwen2)", False))
    if (family == "qwen3") != qk_norm:
        problems.append(("--qk-layernorm" if family == "qwen3" else "no --qk-layernorm (that is qwen3)", False))
    if problems:
        raise HFConfigError(f"{family} models need {problems[0][0]}; this checkpoint does not have it")
    vocab = getattr(args, "tokenizer_vocab_size", None) or args.padded_vocab_size
    config = {"architectures": [FAMILIES[family]], "model_type": family, "vocab_size": vocab,
              "hidden_size": args.hidden_size, "intermediate_size": args.ffn_hidden_size,
              "num_hidden_layers": args.num_layers, "num_attention_heads": args.num_attention_heads,
              "num_key_value_heads": query_groups(args), "head_dim": kv_channels(args), "hidden_act": "silu",
              "max_position_embeddings": args.max_position_embeddings,
              "rms_norm_eps": getattr(args, "layernorm_epsilon", 1e-5), "rope_theta": float(args.rotary_base),
              "tie_word_embeddings": tied(args), "initializer_range": getattr(args, "init_method_std", 0.02),
              "attention_dropout": 0.0, "use_cache": True,
              "torch_dtype": "bfloat16" if getattr(args, "bf16", False) else
              "float16" if getattr(args, "fp16", False) else "float32"}
    if family in ("llama", "mistral", "qwen3"):
        config.update(attention_bias=bool(bias), mlp_bias=bool(bias))
    if family in ("mistral", "qwen2", "qwen3"):
        config.update(sliding_window=None, use_sliding_window=False)
    if getattr(args, "use_rope_scaling", False):
        config["rope_scaling"] = {"rope_type": "llama3", "factor": getattr(args, "rope_scaling_factor", 8.0),
                                  **_LLAMA3_ROPE}
    return config


def norm_to_hf(name: str, tensor: torch.Tensor, args) -> torch.Tensor:
    """--apply-layernorm-1p stores a norm's scale minus one; Hugging Face's Llama norms store the scale."""
    return tensor + 1 if zero_centered_gamma(args) and is_norm_weight(name) else tensor
