"""megatron-core GPTModel from Megatron-LM flags: GPT-2 style or Llama style, local or TE layers."""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig

from megagrow.model.init import initialize_parameters
from megagrow.model.shape import padded_vocab_size


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
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        pipeline_dtype=dtype,
        params_dtype=dtype,
        bf16=args.bf16,
        fp16=args.fp16,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=False,  # megagrow.model.init does it, layout-invariantly
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
    )


def layer_spec(args: argparse.Namespace):
    if transformer_impl(args) == "transformer_engine":
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=args.normalization)


def build_gpt_model(args: argparse.Namespace, config: TransformerConfig, vocab_size: int) -> GPTModel:
    """This pipeline stage's GPTModel, initialised from --seed independently of the layout."""
    tp = args.tensor_model_parallel_size
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(args),
        vocab_size=padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by, tp),
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    initialize_parameters(model, config, args.seed, vocab_size,
                          parallel_state.get_tensor_model_parallel_rank(), tp,
                          tied_embeddings=not args.untie_embeddings_and_output_weights)
    return model
