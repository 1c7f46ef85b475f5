"""The model variants Llama-3.x / Qwen2 / Mistral users bring, end to end: --qk-layernorm, --add-qkv-bias,
--use-rope-scaling, --apply-layernorm-1p (and Megatron-LM's deprecated position flags). Real training runs,
conversions and growth on their checkpoints, compared by logits."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, tiny_args, pretrain_job
from test_checkpoint import logits

from megagrow.cli import main as megagrow_main
from megagrow.training.arguments import ArgumentError, parse_args

# Qwen2/3 style: per-head q/k norms (LayerNorm here, so they have biases too), a bias on QKV alone.
QK = {"--normalization": "LayerNorm", "--qk-layernorm": "", "--disable-bias-linear": "", "--add-qkv-bias": "",
      "--num-attention-heads": "8", "--num-query-groups": "4", "--ffn-hidden-size": "192",
      "--train-iters": "9", "--lr": "1e-2", "--lr-decay-style": "constant", "--eval-iters": "0"}
# Llama-3.1 style RoPE scaling (a factor other than the default, to see it kept), zero-centred norm weights.
ROPE = {"--use-rope-scaling": "", "--rope-scaling-factor": "4", "--apply-layernorm-1p": "",
        "--num-attention-heads": "8", "--num-query-groups": "4", "--ffn-hidden-size": "192",
        "--train-iters": "3", "--eval-iters": "0", "--tensor-model-parallel-size": "2"}


def cli(*argv: str) -> None:
    """`megagrow ...` in this process (no interpreter start per command)."""
    assert megagrow_main([*argv, "--quiet"]) == 0, argv


def close(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """The Qwen-style model trained 9 iterations at TP=1, and 8 of 9 at TP=2 (saved), the Llama-3.1 style one at
    TP=2 (saved)."""
    d = tmp_path_factory.mktemp("variants")
    out = {}
    for name, nproc, flags in (("qk_tp1", 1, QK), ("qk", 2, {**QK, "--tensor-model-parallel-size": "2",
                                                              "--exit-interval": "8", "--save": str(d / "qk")}),
                               ("rope", 2, {**ROPE, "--save": str(d / "rope")})):
        run = pretrain_job(nproc, tiny_args(data_dir, **flags), d / f"{name}.jsonl")
        assert run.returncode == 0, run.output
        out[name] = run
    out["dir"] = d
    return out


@pytest.fixture(scope="module")
def reference(runs, tmp_path_factory):
    """The trained checkpoints' logits (at their own layout, TP=2)."""
    d = tmp_path_factory.mktemp("reference")
    return {name: logits(runs["dir"] / name, 2, d) for name in ("qk", "rope")}


@pytest.mark.slow
def test_qk_norm_gradients_are_summed_over_tensor_parallel_ranks(runs):
    """Each TP rank's q/k norms see only its heads: megatron-core sums their gradients over TP (by name, for
    config.qk_layernorm). Without that sum the losses part by 2e-5 after 6 steps; with it TP=2 is TP=1."""
    tp1, tp2 = runs["qk_tp1"].losses(), runs["qk"].losses()
    assert sorted(tp2) == list(range(1, 9)) and tp1[8] < tp1[1]
    for it in tp2:
        assert abs(tp1[it] - tp2[it]) <= 1e-5 * abs(tp1[it]), (it, tp1[it], tp2[it])


@pytest.mark.slow
def test_checkpoints_record_the_variant_and_hold_its_tensors(runs):
    from megagrow.checkpoint.io import open_checkpoint
    qk, rope = open_checkpoint(str(runs["dir"] / "qk")), open_checkpoint(str(runs["dir"] / "rope"))
    a = qk.args
    assert (a.qk_layernorm, a.add_qkv_bias, a.add_bias_linear, a.use_rope_scaling) == (True, True, False, False)
    b = rope.args  # Megatron-LM 0.16+'s dest and the name older releases (and its loader) read
    assert (b.use_rope_scaling, b.rope_scaling_factor, b.layernorm_zero_centered_gamma, b.apply_layernorm_1p,
            b.add_qkv_bias) == (True, 4.0, True, True, True)
    layer = qk.read_layer(1)["model"]
    for norm in ("q_layernorm", "k_layernorm"):  # over the head size, replicated over TP
        assert layer[f"self_attention.{norm}.weight"].shape == (8,) and f"self_attention.{norm}.bias" in layer
    assert layer["self_attention.linear_qkv.bias"].shape == ((8 + 2 * 4) * 8,)  # per query group: 2 q heads, k, v
    assert {n for n in layer if n.endswith(".bias")} == {"self_attention.linear_qkv.bias",
                                                        "self_attention.q_layernorm.bias",
                                                        "self_attention.k_layernorm.bias"}
    assert not qk.problems() and not rope.problems()
    from megagrow.checkpoint.io import inspect
    assert {k: inspect(str(runs["dir"] / "rope"))["model"][k] for k in ("qk_layernorm", "qkv_bias",
                                                                     "zero_centered_gamma", "rope_scaling_factor")
            } == {"qk_layernorm": False, "qkv_bias": True, "zero_centered_gamma": True, "rope_scaling_factor": 4.0}
    # Trained q/k norm weights moved from 1; zero-centred weights started at 0 and moved from there.
    assert (layer["self_attention.q_layernorm.weight"] - 1).abs().max() > 1e-3
    assert 0 < rope.read_layer(0)["model"]["self_attention.linear_qkv.layer_norm_weight"].abs().max() < 0.1


MODEL_PROBE = """
import os, sys, json
sys.path.insert(0, os.getcwd())
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1])
from megagrow.model.gpt import build_gpt_model, transformer_config
from megagrow.model.layout import layer_param_order
from megagrow.runtime.distributed import initialize_distributed
from megagrow.training import arguments
initialize_distributed(1, 1, "gloo")
out = []
for argv in json.loads(sys.argv[2]):
    a = arguments.build_parser().parse_args(argv)
    arguments._check_model_variants(a)  # the flags' part of validate_args (no data or tokenizer here)
    a.padded_vocab_size, a.max_position_embeddings = 128, a.seq_length
    m = build_gpt_model(a, transformer_config(a), 100)
    names = [n[len("decoder.layers.0."):] for n, _ in m.named_parameters() if n.startswith("decoder.layers.0.")]
    fused = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
             "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}
    out.append({"order_matches": [fused.get(n, n) for n in names] == layer_param_order(a),
                "inv_freq": m.rotary_pos_emb.inv_freq.tolist(),
                "q_norm": type(m.decoder.layers[0].self_attention.q_layernorm).__name__})
print(json.dumps(out))
"""


def test_megatron_core_builds_the_variant(data_dir):
    """megatron-core's GPTModel from the flags: q/k norms (megagrow's, zero-centred), the parameter order
    layout.py writes the torch format in, and Llama-3.1's scaled RoPE frequencies (low ones / factor)."""
    from conftest import free_port
    base = ["--num-layers", "1", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
            "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--normalization", "RMSNorm",
            "--disable-bias-linear", "--add-qkv-bias", "--qk-layernorm", "--use-rotary-position-embeddings",
            "--no-position-embedding"]
    variants = [base, base + ["--apply-layernorm-1p", "--use-rope-scaling", "--rope-scaling-factor", "4"]]
    res = subprocess.run([sys.executable, "-c", MODEL_PROBE, str(free_port()), json.dumps(variants)], cwd=ROOT,
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr
    plain, scaled = json.loads(res.stdout.strip().splitlines()[-1])
    assert plain["order_matches"] and scaled["order_matches"]
    assert (plain["q_norm"], scaled["q_norm"]) == ("RMSNorm", "ZeroCenteredRMSNorm")
    # Head size 16: wavelengths 2pi/f; those above 8192 (Llama-3.1's original context) are divided by the factor.
    for f, g in zip(plain["inv_freq"], scaled["inv_freq"]):
        wavelength = 2 * torch.pi / f
        if wavelength > 8192:
            assert g == pytest.approx(f / 4)
        elif wavelength < 2048:
            assert g == pytest.approx(f)
    assert plain["inv_freq"] != scaled["inv_freq"]


def test_norms_and_initialisation_of_zero_centred_gamma():
    from megatron.core.transformer import TransformerConfig
    from megagrow.model.init import init_global_tensor
    from megagrow.model.norm import TorchNorm
    for kind in ("LayerNorm", "RMSNorm"):
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1, normalization=kind,
                                   layernorm_zero_centered_gamma=True)
        norm, plain = TorchNorm(config, 8), TorchNorm(TransformerConfig(num_layers=1, hidden_size=8,
                                                                        num_attention_heads=1, normalization=kind), 8)
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(-0.5, 0.5, 8))
            plain.weight.copy_(norm.weight + 1)
        x = torch.randn(3, 8)
        assert torch.allclose(norm(x), plain(x), atol=1e-6) and norm.state_dict().keys() == plain.state_dict().keys()
    for name in ("decoder.layers.0.self_attention.q_layernorm.weight", "decoder.final_layernorm.weight",
                 "decoder.layers.0.mlp.linear_fc1.layer_norm_weight"):
        assert init_global_tensor(name, (4,), 1, 0.02, 2, 10, zero_centered_gamma=True).abs().sum() == 0
        assert init_global_tensor(name, (4,), 1, 0.02, 2, 10).eq(1).all()


def test_bad_variant_flags_are_one_line(data_dir):
    for extra, needle in [(["--position-embedding-type", "learned_absolute", "--no-position-embedding"],
                           "--no-position-embedding: only with --position-embedding-type rope"),
                          (["--position-embedding-type", "learned_absolute", "--use-rope-scaling"],
                           "--use-rope-scaling: needs --position-embedding-type rope"),
                          (["--use-rope-scaling", "--rope-scaling-factor", "0"], "--rope-scaling-factor 0: must be")]:
        with pytest.raises(ArgumentError, match=needle):
            parse_args(tiny_args(data_dir) + extra, world_size=1)
    # Megatron-LM's deprecated Llama spelling still means rope, and the QKV bias follows --disable-bias-linear.
    a = parse_args(tiny_args(data_dir, **{"--position-embedding-type": None}) + [
        "--use-rotary-position-embeddings", "--no-position-embedding"], world_size=1)
    assert a.position_embedding_type == "rope" and a.add_qkv_bias
    assert not parse_args(tiny_args(data_dir, **{"--disable-bias-linear": ""}), world_size=1).add_qkv_bias


def test_shapes_and_growth_refusals_of_the_variants():
    from megagrow.growth.operators import GrowthError
    from megagrow.growth.registry import check_growth
    from megagrow.model.shape import ModelShape
    llama = dict(num_layers=2, hidden_size=64, num_attention_heads=4, normalization="RMSNorm", add_bias_linear=False,
                 position_embedding_type="rope", untie_embeddings_and_output_weights=True, vocab_size=100)
    qwen, plain = ModelShape(**llama, add_qkv_bias=True, qk_layernorm=True), ModelShape(**llama)
    assert qwen.parameters() - plain.parameters() == 2 * (3 * 64 + 2 * 16)  # QKV bias, q/k norm weights per layer
    assert qwen.to_flags()["add_qkv_bias"] and qwen.to_flags()["qk_layernorm"]
    flags = ModelShape.from_flags({"apply_layernorm_1p": True, "use_rotary_position_embeddings": True, "num_layers": 1,
                                   "hidden_size": 8, "num_attention_heads": 1}).to_flags()  # a plan's flag names
    assert flags["apply_layernorm_1p"] and flags["position_embedding_type"] == "rope"
    assert "layernorm_zero_centered_gamma" not in flags and "add_qkv_bias" not in plain.to_flags()
    with pytest.raises(GrowthError, match="--qk-layernorm norms"):
        check_growth("zero", qwen, qwen.with_sizes(hidden_size=128))
    check_growth("zero", qwen, qwen.with_sizes(ffn_hidden_size=512, num_attention_heads=8))  # head size kept
    check_growth("fpi", qwen, qwen.with_sizes(hidden_size=128))


@pytest.mark.slow
def test_conversion_keeps_logits_and_the_variant(data_dir, runs, reference, tmp_path):
    """TP=2 -> TP=1 PP=2 in both formats: the same logits and the variant's args; resumed from the legacy torch
    format (the optimizer state by parameter order), the run trains as the uninterrupted TP=1 run."""
    from megagrow.checkpoint.io import open_checkpoint
    for name, fmt in (("qk", "torch"), ("rope", "torch_dist")):
        src, out = runs["dir"] / name, tmp_path / f"{name}_tp1pp2"
        extra = ["--rechunk"] if fmt == "torch_dist" else []
        cli("checkpoint", "convert", "--load", str(src), "--save", str(out), "--target-tp", "1", "--target-pp", "2",
            "--ckpt-format", fmt, *extra)
        # fp32 sums in another order at another TP: within a few ulps of the largest logit
        assert close(logits(out, 2, tmp_path), reference[name]) <= 2e-6 * reference[name].abs().max().item(), name
        a = open_checkpoint(str(out)).args
        assert (a.qk_layernorm, a.add_qkv_bias, a.use_rope_scaling, a.rope_scaling_factor,
                a.layernorm_zero_centered_gamma) == ((True, True, False, 8.0, False) if name == "qk"
                                                     else (False, True, True, 4.0, True))
    resumed = pretrain_job(2, tiny_args(data_dir, **{**QK, "--pipeline-model-parallel-size": "2", "--ckpt-format": "torch",
                                                 "--load": str(tmp_path / "qk_tp1pp2")}), tmp_path / "resumed.jsonl")
    assert resumed.returncode == 0, resumed.output
    assert sorted(resumed.losses()) == [9]
    assert abs(resumed.losses()[9] - runs["qk_tp1"].losses()[9]) <= 1e-5 * runs["qk_tp1"].losses()[9]


@pytest.mark.slow
def test_growth_keeps_the_function_of_the_variants(runs, reference, tmp_path):
    """The function-preserving operators of tests/test_growth.py on the variants: depth `zero` and `redundant`
    (zero-centred norms: scale 0 is weight -1), width `fpi` (QKV biases per query group, q/k norms kept),
    width `zero` (with --apply-layernorm-1p the RMSNorm scale 1 + w is what it rescales)."""
    from megagrow.checkpoint.io import open_checkpoint
    qk = runs["dir"] / "qk"
    cases = [("qk", "zero", ["--num-layers", "6", "--target-tp", "1"], 1),
             ("qk", "fpi", ["--hidden-size", "128", "--ffn-hidden-size", "384", "--num-attention-heads", "16",
                            "--num-query-groups", "8"], 2),
             ("rope", "redundant", ["--num-layers", "6", "--target-tp", "1"], 1),
             ("rope", "zero", ["--hidden-size", "96", "--ffn-hidden-size", "256", "--num-attention-heads", "12",
                               "--num-query-groups", "6", "--target-tp", "1"], 1)]
    for i, (name, op, sizes, nproc) in enumerate(cases):
        out = tmp_path / f"{name}_{op}_{i}"
        cli("checkpoint", "grow", "--load", str(runs["dir"] / name), "--save", str(out), "--op", op, *sizes)
        assert close(logits(out, nproc, tmp_path), reference[name]) <= 1e-5, (name, op, sizes)
    grown = open_checkpoint(str(tmp_path / "rope_redundant_2"))
    inserted = grown.read_layer(2)  # after every 2nd old layer: I2
    norm = "self_attention.linear_qkv.layer_norm_weight"
    assert inserted["model"][norm].eq(-1).all() and inserted["exp_avg"][norm].eq(0).all()
    assert grown.args.use_rope_scaling and grown.args.rope_scaling_factor == 4.0
    wide = open_checkpoint(str(tmp_path / "qk_fpi_1"))
    old_layer, new_layer = open_checkpoint(str(qk)).read_layer(0)["model"], wide.read_layer(0)["model"]
    assert torch.equal(new_layer["self_attention.q_layernorm.weight"], old_layer["self_attention.q_layernorm.weight"])
    bias = old_layer["self_attention.linear_qkv.bias"]  # 4 groups of (2 q + k + v) x 8 rows, duplicated
    assert torch.equal(new_layer["self_attention.linear_qkv.bias"], torch.cat([bias, bias]))


@pytest.mark.slow
def test_resume_needs_the_checkpoints_variant(data_dir, runs):
    """A resumed run must ask for the checkpoint's variant: one line naming the flag (the trainer's check)."""
    from megagrow.checkpoint.errors import CheckpointError
    from megagrow.checkpoint.io import open_checkpoint
    from megagrow.checkpoint.trainer import _check_compatible
    for name, drop, needle in (("qk", "--qk-layernorm", "checkpoint has --qk-layernorm True, this run asks for False"),
                               ("qk", "--add-qkv-bias", "checkpoint has --add-qkv-bias True, this run asks for False"),
                               ("rope", "--apply-layernorm-1p", "checkpoint has --apply-layernorm-1p True")):
        saved = open_checkpoint(str(runs["dir"] / name)).args
        args = parse_args(tiny_args(data_dir, **{**(QK if name == "qk" else ROPE), drop: None}), world_size=2)
        args.tokenizer_vocab_size = saved.tokenizer_vocab_size
        with pytest.raises(CheckpointError, match=needle):
            _check_compatible(saved, args, "ckpt")
