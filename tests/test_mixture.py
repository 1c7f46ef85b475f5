"""MixtureGrowth (growth.mixture): two TP=2 models recombined into one of twice the width, tensor by tensor,
hidden state by hidden state, trained at TP=2 PP=2; its plan stage (two small models side by side).

Run as a script under torchrun, this file is also the worker that saves per-layer hidden states."""

import contextlib
import io
import os
import sys

import pytest
import torch

from conftest import ranks

from megagrow.growth.operators import GrowthError

SMALL = {"hidden_size": 32, "ffn_hidden_size": 64, "num_attention_heads": 4, "num_query_groups": 2}
WIDE = {"--hidden-size": "64", "--ffn-hidden-size": "128", "--num-attention-heads": "8", "--num-query-groups": "4"}
WIDE_ARGV = [x for kv in WIDE.items() for x in kv]
SIZES = {"hidden_size": 64, "ffn_hidden_size": 128, "num_attention_heads": 8, "num_query_groups": 4}


def pair_plan(data_dir):
    """Two small models side by side (seeds 1 and 2, TP=2 each on half of 4 processes) to iteration 3, then
    mixture into the wide target at TP=2 PP=2 for two iterations of the budget."""
    from megagrow.scheduling.plan import Plan, Stage
    target = {"num_layers": 2, **SIZES, "group_query_attention": True, "swiglu": True, "normalization": "RMSNorm",
              "position_embedding_type": "rope", "untie_embeddings_and_output_weights": True,
              "hidden_dropout": 0.0, "attention_dropout": 0.0}
    training = {"global_batch_size": 4, "micro_batch_size": 2, "seq_length": 32, "lr": 3e-3, "lr_warmup_iters": 1,
                "log_interval": 1, "eval_interval": 3, "eval_iters": 1, "seed": 1,
                "data_cache_path": f"{data_dir}/cache"}
    data = {"data_path": [f"{data_dir}/corpus_text_document"], "split": "90,5,5",
            "tokenizer_type": "GPTSentencePieceTokenizer", "tokenizer_model": f"{data_dir}/tok.model"}
    stages = [Stage("small", model=dict(SMALL), pair={"seeds": [1, 2]}, stop={"policy": "iters", "iteration": 3},
                    parallel={"nproc": 4, "tensor_model_parallel_size": 2}),
              Stage("wide", grow={"op": "mixture"}, parallel={"nproc": 4, "tensor_model_parallel_size": 2,
                                                                "pipeline_model_parallel_size": 2})]
    plan = Plan(target, {}, training, data, stages, vocab_size=1024)
    flops = 3 * 2 * plan.step_flops(stages[0]) + 2.5 * plan.step_flops()
    plan.budget = {"flops": flops, "target_scratch_tokens": int(flops / plan.step_flops() * 128)}
    return plan


@pytest.fixture(scope="module")
def pair(data_dir, tmp_path_factory):
    """`megagrow run` of pair_plan; a/ and b/: its two small models (TP=2, iteration 3); grown/: their mixture
    by `checkpoint grow` at TP=2 PP=2."""
    from megagrow.cli import main
    from megagrow.scheduling.driver import run
    from megagrow.scheduling.plan import dump_plan
    d = tmp_path_factory.mktemp("mixture")
    (d / "plan.yaml").write_text(dump_plan(pair_plan(data_dir)))
    run(str(d / "plan.yaml"), str(d / "run"), progress=False)
    for name, k in (("a", 1), ("b", 2)):
        os.symlink(d / "run" / "stage0_small" / f"pair{k}" / "ckpt", d / name)
    with contextlib.redirect_stdout(io.StringIO()) as said:
        assert main(["checkpoint", "grow", "--load", str(d / "a"), "--load-second", str(d / "b"), "--save",
                     str(d / "grown"), "--op", "mixture", *WIDE_ARGV, "--target-pp", "2", "--quiet"]) == 0
    assert "query groups 2 -> 4; mixed blocks init=orthogonal" in said.getvalue()
    return d


def _blocks(t: torch.Tensor, fc1: bool):
    """The 2x2 blocks of a grown weight ([[A-rows x A-cols, ...], ...]); SwiGLU fc1: gate and up stacked."""
    halves = t.chunk(2) if fc1 else [t]
    rows = [[h.chunk(2)[i] for h in halves] for i in (0, 1)]
    return [[torch.cat([r.chunk(2, 1)[j] for r in rows[i]]) for j in (0, 1)] for i in (0, 1)]


def test_mixed_blocks_follow_the_formula_in_both_formats(pair, tmp_path):
    """Every grown tensor against the two models': theirs on the diagonal blocks, a W_A + b W_B off it with
    orthonormal coefficients, zero Adam moments there; joined norms, biases, embeddings; the output layer halved.
    Written as torch_dist at TP=2 PP=2 and torch at TP=1 PP=2; a torch-format source read back in."""
    from megagrow.checkpoint.io import open_checkpoint
    from megagrow.growth.grow import grow
    from megagrow.growth.mixture import coefficients
    grow(str(pair / "a"), str(tmp_path / "legacy"), "mixture", SIZES, 1, 2, "torch", progress=False,
         second=str(pair / "b"))
    a, b = open_checkpoint(str(pair / "a")), open_checkpoint(str(pair / "b"))
    seed = a.args.seed
    for root in (pair / "grown", tmp_path / "legacy"):
        g = open_checkpoint(str(root))
        assert g.args.hidden_size == 64 and g.args.num_query_groups == 4 and g.iteration == 3
        assert (g.args.tensor_model_parallel_size, g.args.pipeline_model_parallel_size) == \
            ((2, 2) if root == pair / "grown" else (1, 2))
        units = [(a.read_globals(), b.read_globals(), g.read_globals(), "")] + \
            [(a.read_layer(i), b.read_layer(i), g.read_layer(i), f"decoder.layers.{i}.") for i in range(2)]
        for ua, ub, ug, prefix in units:
            for name, w in ug["model"].items():
                wa, wb = ua["model"][name], ub["model"][name]
                if w.dim() == 1:  # biases, norms: A's then B's (SwiGLU fc1 bias: gate, then up)
                    parts = 2 if name == "mlp.linear_fc1.bias" else 1
                    want = [t for pa, pb in zip(wa.chunk(parts), wb.chunk(parts)) for t in (pa, pb)]
                    assert torch.equal(w, torch.cat(want)), name
                elif name.endswith("embeddings.weight"):
                    assert torch.equal(w, torch.cat([wa, wb], 1)), name
                elif name == "output_layer.weight":  # the mean of the two logits
                    assert torch.equal(w, torch.cat([wa, wb], 1) / 2)
                else:
                    fc1 = name.endswith("linear_fc1.weight")
                    (c00, c01), (c10, c11) = coefficients(seed, prefix + name).tolist()
                    blocks, moments = _blocks(w, fc1), _blocks(ug["exp_avg"][name], fc1)
                    assert torch.equal(blocks[0][0], wa) and torch.equal(blocks[1][1], wb), name
                    assert torch.allclose(blocks[0][1], c00 * wa + c01 * wb, atol=1e-6), name
                    assert torch.allclose(blocks[1][0], c10 * wa + c11 * wb, atol=1e-6), name
                    assert abs(c00 * c10 + c01 * c11) < 1e-6 and abs(c00 ** 2 + c01 ** 2 - 1) < 1e-6
                    assert torch.equal(moments[0][0], ua["exp_avg"][name]), name
                    assert torch.equal(moments[1][1], ub["exp_avg"][name]), name
                    assert moments[0][1].abs().sum() == 0 and moments[1][0].abs().sum() == 0
    # a torch-format source (and one at TP=2 PP=2) in: the two wide models recombined once more
    grow(str(tmp_path / "legacy"), str(tmp_path / "wider"), "mixture", {k: 2 * v for k, v in SIZES.items()}, 1, 1,
         "torch_dist", progress=False, second=str(pair / "grown"))
    qkv = "self_attention.linear_qkv.weight"
    w, first, second = (open_checkpoint(str(p)).read_layer(1)["model"][qkv]
                        for p in (tmp_path / "wider", tmp_path / "legacy", pair / "grown"))
    rows, cols = first.shape
    assert torch.equal(w[:rows, :cols], first) and torch.equal(w[rows:, cols:], second)


def test_pair_stage_trains_two_models_and_the_mixture_trains_at_tp2_pp2(data_dir, pair):
    """The plan's pair stage: two different models side by side, both charged to the budget; the mixture of
    the two (grown by the driver from TP=2 checkpoints) loads at TP=2 PP=2 and trains to the budget."""
    from megagrow.checkpoint.io import open_checkpoint
    from megagrow.runs.directory import RunDir
    from megagrow.scheduling.plan import load_plan
    plan, run = load_plan(str(pair / "plan.yaml")), RunDir(str(pair / "run"))
    small, wide = run.stage(0, "small"), run.stage(1, "wide")
    members = small.decision()["members"]
    assert [m["iteration"] for m in members.values()] == [3, 3] and small.decision()["iteration"] == 3
    la, lb = (open_checkpoint(str(pair / k)).read_layer(0)["model"]["mlp.linear_fc1.weight"] for k in "ab")
    assert not torch.equal(la, lb)  # two seeds, two models
    assert small.decision()["flops"] == pytest.approx(6 * plan.step_flops(plan.stages[0]))
    grown = open_checkpoint(os.path.join(wide.ckpt, "iter_0000003"))  # the mixture, before training
    assert (grown.args.tensor_model_parallel_size, grown.args.pipeline_model_parallel_size) == (2, 2)
    assert grown.args.hidden_size == 64 and grown.args.num_query_groups == 4
    train = wide.metrics()["train"]
    assert [r["iteration"] for r in train] == [4, 5] and all(0 < r["lm loss"] < 10 for r in train)
    assert train[0]["flops"] == pytest.approx(small.decision()["flops"] + plan.step_flops())  # both models paid
    assert wide.decision()["flops"] <= plan.budget["flops"]
    valid = small.metrics()["valid"]  # the stage's curve: the two models' mean loss, their summed FLOPs
    assert valid and valid[-1]["flops"] == pytest.approx(small.decision()["flops"])


def _permuted(view):
    """The same function with its hidden dims, FFN units and query groups shuffled: a second model whose norms
    see the first's statistics, so that a mixture of the two can split exactly (a norm spans all 2h dims)."""
    from megagrow.checkpoint.view import DerivedView
    from megagrow.growth.width import Direct, WidthPlan, _blocks
    from megagrow.model.shape import ModelShape
    shape = ModelShape.from_args(view.args)
    plan = WidthPlan(Direct(), shape, shape)
    g = torch.Generator().manual_seed(7)
    h, f, q, d = shape.hidden_size, shape.ffn_hidden_size, shape.num_query_groups, shape.kv_channels
    hidden, units, groups = (torch.randperm(n, generator=g) for n in (h, f, q))
    maps = {"hidden": hidden, "units": units, "fc1_rows": torch.cat([units, units + f]),
            "qkv_rows": _blocks(groups, (shape.num_attention_heads // q + 2) * d),
            "heads": _blocks(_blocks(groups, shape.num_attention_heads // q), d)}

    def permute(name, t):
        for dim, (m, _) in enumerate(plan.axes(name, maps)):
            t = t if m is None else t.index_select(dim, m)
        return t

    class Permuted(DerivedView):
        def read_globals(self):
            return {s: {n: permute(n, t) for n, t in u.items()} for s, u in self.inner.read_globals().items()}

        def read_layer(self, i):
            return {s: {n: permute(n, t) for n, t in u.items()} for s, u in self.inner.read_layer(i).items()}
    return Permuted(view)


@pytest.mark.slow
def test_zero_coefficients_split_hidden_states_exactly(pair, tmp_path):
    """With the mixed blocks zero, every layer's output of the grown model is [the first model's, the second's]
    on the same tokens (fp32, 1e-5), and its logits their mean: the block layout of QKV with query groups, of
    SwiGLU's halves, of the norms and embeddings. The second model is the first with its axes shuffled (a norm
    over all 2h dims splits only when both halves have the same statistics; different weights everywhere)."""
    from megagrow.checkpoint.io import open_checkpoint, target_args, write_checkpoint
    from megagrow.growth.grow import grow
    a = open_checkpoint(str(pair / "a"))
    second = _permuted(a)
    assert not torch.equal(second.read_layer(0)["model"]["mlp.linear_fc1.weight"],
                           a.read_layer(0)["model"]["mlp.linear_fc1.weight"])
    write_checkpoint(second, str(tmp_path / "b"), target_args(a.args, 1, 1, "torch_dist"), "torch_dist", True,
                     progress=False)
    grow(str(pair / "a"), str(tmp_path / "g"), "mixture:init=zero", SIZES, 1, 1, progress=False,
         second=str(tmp_path / "b"))
    out = tmp_path / "hidden.pt"
    code, output = ranks(1, __file__, [str(out), *(str(p) for p in (pair / "a", tmp_path / "b", tmp_path / "g"))])
    assert code == 0, output
    ha, hb, hg = torch.load(out)
    assert len(hg) == 4  # both layers, the final norm, the logits
    for i, (x, y, z) in enumerate(zip(ha[:-1], hb[:-1], hg[:-1])):  # [seq, batch, hidden] each
        assert (z[..., :32] - x).abs().max() <= 1e-5 and (z[..., 32:] - y).abs().max() <= 1e-5, i
    assert (hg[-1] - (ha[-1] + hb[-1]) / 2).abs().max() <= 1e-5  # logits: the two models' mean


def test_bad_input_is_one_line_and_writes_nothing(pair, tmp_path, capsys):
    """In process (no interpreter start per case), through the command's own entry point."""
    from megagrow.cli import main
    from megagrow.growth.grow import grow
    grow(str(pair / "a"), str(tmp_path / "deeper"), "stack:g=2", {}, progress=False)
    out = tmp_path / "o"
    for argv, needle in [(["--load-second", str(tmp_path / "deeper"), *WIDE_ARGV], "its num_layers is 4, the first"),
                         (WIDE_ARGV, "give the second with --load-second"),
                         (["--load-second", str(pair / "b"), *WIDE_ARGV[:-2], "--num-query-groups", "2"],
                          "--num-query-groups must be 4 (2 x 2), not 2"),
                         (["--load-second", str(pair / "b"), "--hidden-size", "48"], "--hidden-size must be 64"),
                         (["--load-second", str(pair / "b"), "--num-layers", "4"], "not depth"),
                         (["--load-second", str(pair / "b"), "--save", str(pair / "b" / "x"), *WIDE_ARGV],
                          "inside the source")]:
        assert main(["checkpoint", "grow", "--load", str(pair / "a"), "--save", str(out), "--op", "mixture",
                     *argv]) == 1, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (argv, lines)
        assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")
    assert main(["checkpoint", "grow", "--load", str(pair / "a"), "--load-second", str(pair / "b"), "--save", str(out),
                 "--op", "stack:g=2"]) == 1
    assert "--load-second is read only by operators that recombine two models" in capsys.readouterr().err


def test_operator_is_listed_and_plans_are_checked():
    from megagrow.growth.registry import operators_table, plan_growth
    from megagrow.model.shape import ModelShape
    assert any(line.startswith("mixture ") and "width" in line for line in operators_table().splitlines())
    mha = ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                     untie_embeddings_and_output_weights=True)  # one query group per head
    sizes = {k: v for k, v in SIZES.items() if k != "num_query_groups"}
    plan = plan_growth("mixture:init=random,scale=0.5", mha, mha.with_sizes(**sizes))
    assert (plan.init, plan.scale, plan.new.num_query_groups) == ("random", 0.5, 8)
    for spec, shape, grown, needle in [
            ("mixture", mha, {"hidden_size": 64}, "--ffn-hidden-size must be 128"),
            ("mixture:init=copy", mha, sizes, "init=copy is not one of"),
            ("mixture:scale=x", mha, sizes, "scale='x' is not a number"),
            ("mixture:g=2", mha, sizes, "unknown parameter g"),
            ("mixture", ModelShape(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64), sizes,
             "tied embeddings")]:
        with pytest.raises(GrowthError, match=needle):
            plan_growth(spec, shape, shape.with_sizes(**grown))


def test_plan_schema_checks_the_pair_stage(data_dir, tmp_path):
    import yaml
    from megagrow.scheduling.driver import dry_run
    from megagrow.scheduling.plan import describe, dump_plan
    from megagrow.scheduling.schema import check_plan
    from megagrow.scheduling.timing import PlanError
    plan = pair_plan(data_dir)
    assert "(two models)" in describe(plan) and plan.planned_iterations() == [3, 2]
    (tmp_path / "plan.yaml").write_text(dump_plan(plan))
    lines = dry_run(str(tmp_path / "plan.yaml"), str(tmp_path / "run"))
    launches = [line for line in lines if "pretrain_gpt.py" in line]
    assert len(launches) == 3 and "--seed 1 " in launches[0] and "--seed 2 " in launches[1]
    assert all("--nproc-per-node 2 " in line for line in launches[:2]) and "--nproc-per-node 4 " in launches[2]
    grow = next(line for line in lines if "checkpoint grow" in line)
    assert "pair1/ckpt --load-second " in grow and "pair2/ckpt" in grow and "--op mixture" in grow
    assert not os.path.exists(tmp_path / "run")
    raw = yaml.safe_load(dump_plan(plan))
    for change, needle in [
            ({"stop": {"policy": "converge", "max_iteration": 3}}, "stages[0].pair: both models stop together"),
            ({"parallel": {"nproc": 2, "tensor_model_parallel_size": 2}}, "half of parallel.nproc 2"),
            ({"pair": {"seeds": [1, 1]}}, "stages[0].pair.seeds: the same seed and data twice"),
            ({"pair": {"seeds": [1]}}, "stages[0].pair.seeds: expected two integers"),
            ({"pair": {"data_path": ["x"]}}, "stages[0].pair.data_path: expected two data paths"),
            ({"pair": {"seed": 1}}, "stages[0].pair.seed: unknown key"),
            ({"pair": None}, "stages[1].grow.op: mixture recombines two models: the stage before needs `pair`")]:
        bad = yaml.safe_load(dump_plan(plan))
        bad["stages"][0].update(change)
        with pytest.raises(PlanError, match=needle.replace("(", r"\(").replace("[", r"\[")):
            check_plan(bad)
    raw["stages"][1]["grow"] = {"op": "fpi"}
    with pytest.raises(PlanError, match=r"stages\[0\].pair: the next stage must grow the two models with mixture"):
        check_plan(raw)


def _hidden_states_worker(out: str, roots: list[str]) -> None:
    """Each checkpoint at TP=1 PP=1 on the same tokens: every layer's output, the final norm's, the logits."""
    from megagrow.checkpoint.io import open_checkpoint
    from megagrow.checkpoint.trainer import load_checkpoint
    from megagrow.checkpoint.view import vocab_rows
    from megagrow.model.gpt import build_gpt_model, transformer_config
    from megagrow.runtime.distributed import destroy, initialize_distributed, set_seeds

    class Wrapped:
        def __init__(self, module):
            self.module = module
    initialize_distributed(1, 1, "gloo")
    results = []
    for root in roots:
        view = open_checkpoint(root)
        args = view.args
        view.close()
        args.no_load_optim = args.no_load_rng = True
        args.finetune = False
        args.tensor_model_parallel_size = args.pipeline_model_parallel_size = args.data_parallel_size = 1
        args.transformer_impl = None
        args.padded_vocab_size = vocab_rows(args, 1)
        set_seeds(args.seed)
        model = build_gpt_model(args, transformer_config(args), args.tokenizer_vocab_size, None)
        load_checkpoint(root, [Wrapped(model)], None, None, args)
        model.eval()
        states = []
        for module in [*model.decoder.layers, model.decoder.final_layernorm]:
            module.register_forward_hook(lambda m, i, o: states.append((o[0] if isinstance(o, tuple) else o).clone()))
        tokens = torch.randint(0, args.tokenizer_vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits = model(tokens, torch.arange(32).expand(2, 32), None)
        results.append(states + [logits[..., :args.tokenizer_vocab_size]])
    torch.save(results, out)
    destroy()


if __name__ == "__main__":
    _hidden_states_worker(sys.argv[1], sys.argv[2:])
