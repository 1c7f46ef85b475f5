"""megatron-core GPTModel from Megatron-LM flags: GPT-2 style or Llama style, local or TE layers."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

from megagrow.model.init import initialize_parameters
from megagrow.model.norm import TorchNorm
from megagrow.model.shape import padded_vocab_size, zero_centered_gamma


def transformer_impl(args: argparse.Namespace) -> str:
    if args.transformer_impl:
        return args.transformer_impl
    try:
        import transformer_engine  # noqa: F401  (optional GPU extra)
    except ImportError:
        return "local"
    return "transformer_engine" if torch.cuda.is_available() else "local"


def transformer_config(args: argparse.Namespace) -> TransformerConfig:
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return TransformerConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        normalization=args.normalization,
        layernorm_epsilon=args.layernorm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        bias_activation_fusion=False,
        add_bias_linear=args.add_bias_linear,
        # Llama-3 / Qwen2 / Mistral variants (getattr: older checkpoints' args predate them).
        add_qkv_bias=getattr(args, "add_qkv_bias", False),
        qk_layernorm=getattr(args, "qk_layernorm", False),
        layernorm_zero_centered_gamma=zero_centered_gamma(args),
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=getattr(args, "virtual_pipeline_model_parallel_size", None),
        **_p2p(args),
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # megagrow.model.init does it, layout-invariantly
        persist_layer_norm=False,
        apply_rope_fusion=False,
        **speed_and_memory(args),
    )


def _p2p(args) -> dict:
    """Overlapped pipeline sends and receives: the interleaved schedule's (a virtual pipeline) alone."""
    overlap = getattr(args, "overlap_p2p_comm", False) and bool(getattr(args, "virtual_pipeline_model_parallel_size",
                                                                        None))
    return {"overlap_p2p_comm": overlap, "batch_p2p_comm": not overlap}


# Megatron-LM's speed and memory flags (dest: default), for args that predate them (older checkpoints).
SPEED_DEFAULTS = {"sequence_parallel": False, "recompute_granularity": None, "recompute_method": None,
                  "recompute_num_layers": None, "recompute_modules": None, "attention_backend": "auto",
                  "attention_softmax_in_fp32": False, "calculate_per_token_loss": False,
                  "cross_entropy_loss_fusion": False, "cross_entropy_fusion_impl": "native",
                  "masked_softmax_fusion": True, "gradient_accumulation_fusion": True, "fp8": None,
                  "fp8_amax_history_len": 1, "fp8_amax_compute_algo": "most_recent", "fp8_param_gather": False}


def speed_and_memory(args: argparse.Namespace) -> dict:
    """TransformerConfig fields from Megatron-LM's speed and memory flags, handed to megatron-core as they are."""
    a = {k: getattr(args, k, v) for k, v in SPEED_DEFAULTS.items()}
    backend = a["attention_backend"]  # a string here; Megatron-LM's saved args hold the enum
    return dict(
        sequence_parallel=a["sequence_parallel"] and args.tensor_model_parallel_size > 1,
        recompute_granularity=a["recompute_granularity"], recompute_method=a["recompute_method"],
        recompute_num_layers=a["recompute_num_layers"], recompute_modules=a["recompute_modules"],
        attention_backend=backend if isinstance(backend, AttnBackend) else AttnBackend[backend],
        attention_softmax_in_fp32=a["attention_softmax_in_fp32"],
        calculate_per_token_loss=a["calculate_per_token_loss"],
        cross_entropy_loss_fusion=a["cross_entropy_loss_fusion"],
        cross_entropy_fusion_impl=a["cross_entropy_fusion_impl"],
        # Fused CUDA kernels (Apex/TE): asked for only where they can exist.
        masked_softmax_fusion=a["masked_softmax_fusion"] and torch.cuda.is_available(),
        gradient_accumulation_fusion=a["gradient_accumulation_fusion"] and _has_fused_wgrad(),
        fp8=a["fp8"], fp8_amax_history_len=a["fp8_amax_history_len"],
        fp8_amax_compute_algo=a["fp8_amax_compute_algo"], fp8_param=a["fp8_param_gather"])


def _has_fused_wgrad() -> bool:
    """megatron-core's gradient-accumulation fusion needs Apex's or TE's fused weight-gradient kernel."""
    if not torch.cuda.is_available():
        return False
    try:
        import fused_weight_gradient_mlp_cuda  # noqa: F401  (NVIDIA Apex)
        return True
    except ImportError:
        pass
    try:
        import transformer_engine  # noqa: F401
        return True
    except ImportError:
        return False


def layer_spec(args: argparse.Namespace, config: TransformerConfig, vp_stage: int | None = None):
    if transformer_impl(args) == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    # The local layers with megagrow's norm (sequence parallel without Apex), final norm included.
    spec = get_gpt_layer_local_spec(normalization=args.normalization, qk_layernorm=config.qk_layernorm)
    spec.submodules.input_layernorm = spec.submodules.pre_mlp_layernorm = TorchNorm
    if config.qk_layernorm:
        attention = spec.submodules.self_attention.submodules
        attention.q_layernorm = attention.k_layernorm = TorchNorm
    layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[spec] * layers, layer_norm=TorchNorm)


def build_gpt_model(args: argparse.Namespace, config: TransformerConfig, vocab_size: int,
                    vp_stage: int | None = None) -> GPTModel:
    """This pipeline stage's GPTModel (its `vp_stage`-th chunk with a virtual pipeline), initialised from
    --seed independently of the layout."""
    tp = args.tensor_model_parallel_size
    first = parallel_state.is_pipeline_first_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    last = parallel_state.is_pipeline_last_stage(ignore_virtual=vp_stage is None, vp_stage=vp_stage)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(args, config, vp_stage),
        vocab_size=padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by, tp),
        max_sequence_length=args.max_position_embeddings,
        pre_process=first,
        post_process=last,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        rope_scaling=getattr(args, "use_rope_scaling", False),  # Llama-3.1's frequency scaling
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
        **({"vp_stage": vp_stage} if vp_stage is not None else {}),
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    initialize_parameters(model, config, args.seed, vocab_size,
                          parallel_state.get_tensor_model_parallel_rank(), tp,
                          tied_embeddings=not args.untie_embeddings_and_output_weights)
    return model
