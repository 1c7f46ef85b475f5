"""Depth growth operators: the papers' layer orders, optimizer state, function preservation, resumed training."""

import os

import pytest
import torch

from conftest import tiny_args, pretrain_job
from test_checkpoint import logits, megagrow

from megagrow.growth.depth import GrowthError, NewLayer, connection_rate, describe
from megagrow.growth.registry import plan_growth
from megagrow.model.shape import ModelShape


def depth_plan(spec: str, old: int, new: int | None) -> list[NewLayer]:
    """The layer plan of `spec` for old -> new layers (None: the spec fixes the depth), through the registry."""
    shape = ModelShape(num_layers=old, hidden_size=64, num_attention_heads=8)
    return plan_growth(spec, shape, shape.with_sizes(num_layers=new)).layers

# FFN 192 given explicitly: Megatron-LM's SwiGLU default for hidden 64 is 128; the width tests index 192 units.
LLAMA6 = {"--num-layers": "6", "--ffn-hidden-size": "192", "--num-attention-heads": "8", "--num-query-groups": "4", "--train-iters": "10",
          "--exit-interval": "3", "--tensor-model-parallel-size": "2", "--pipeline-model-parallel-size": "2"}
GPT2_6 = {"--num-layers": "6", "--group-query-attention": None, "--num-query-groups": None, "--swiglu": None,
          "--normalization": None, "--position-embedding-type": None, "--untie-embeddings-and-output-weights": None,
          "--train-iters": "10", "--exit-interval": "3", "--tensor-model-parallel-size": "2",
          "--pipeline-model-parallel-size": "2", "--ckpt-format": "torch"}


@pytest.mark.parametrize("spec,layers,expected", [
    # notes/papers.md, LAG 6 -> 9 (new layers in brackets there; R = random)
    ("lag:p=1,b=1,init=dup", 9, "1 1 2 2 3 3 4 5 6"),
    ("lag:p=4,b=3,init=dup", 9, "1 2 3 4 5 6 4 5 6"),
    ("lag:p=2,b=1,init=random", 9, "1 2 R 3 R 4 R 5 6"),
    ("lag:p=3,b=3,init=random", 9, "1 2 3 4 5 R R R 6"),
    ("lag:last", 9, "1 2 3 4 5 6 4 5 6"),
    # partial stacking, 6 -> 24
    ("stack:g=4", None, " ".join(["1 2 3 4 5 6"] * 4)),
    ("partial:123456*4", None, " ".join(["1 2 3 4 5 6"] * 4)),
    ("partial:12-3456*5-56", None, "1 2 " + " ".join(["3 4 5 6"] * 5) + " 5 6"),
    ("partial:1-2,3-6*5,5-6", None, "1 2 " + " ".join(["3 4 5 6"] * 5) + " 5 6"),
    ("partial:12-345*7-6", None, "1 2 " + " ".join(["3 4 5"] * 7) + " 6"),
    ("partial:123-456*7", None, "1 2 3 " + " ".join(["4 5 6"] * 7)),
    ("partial:1234-56*10", None, "1 2 3 4 " + " ".join(["5 6"] * 10)),
    ("partial:12-34*10-56", None, "1 2 " + " ".join(["3 4"] * 10) + " 5 6"),
    ("partial:1-234*7-56", None, "1 " + " ".join(["2 3 4"] * 7) + " 5 6"),
    ("partial:123*7-456", None, " ".join(["1 2 3"] * 7) + " 4 5 6"),
    ("interpolate:g=2", None, "1 1 2 2 3 3 4 4 5 5 6 6"),
    ("redundant", 9, "1 2 I2 3 4 I4 5 6 I6"),
    ("zero", 12, "1 Z1 2 Z2 3 Z3 4 Z4 5 Z5 6 Z6"),
])
def test_layer_plans_match_the_papers(spec, layers, expected):
    assert describe(depth_plan(spec, 6, layers)) == expected


def test_connection_rate_and_bad_specs():
    assert connection_rate(depth_plan("stack:g=2", 3, None)) == pytest.approx(0.8)
    assert connection_rate(depth_plan("interpolate:g=2", 3, None)) == pytest.approx(0.4)
    for spec, layers, needle in [("grow", 9, "unknown operator"), ("lag:p=1,b=2,init=dup", 9, "b=2 does not divide"),
                                 ("lag:p=5,b=1", 9, "p=5 is out of range 1..4"), ("lag:p=1,b=1,init=zero", 9, "init"),
                                 ("zero", 4, "must exceed"), ("stack:g=2", 18, "not --num-layers 18"),
                                 ("partial:12-78", None, "layer 8 does not exist"), ("partial:1-2,9-9", None, "outside"),
                                 ("partial:12", None, "cannot shrink"), ("lag:q=1", 9, "unknown parameter")]:
        with pytest.raises(GrowthError, match=needle):
            depth_plan(spec, 6, layers)


@pytest.fixture(scope="module")
def small(data_dir, tmp_path_factory):
    """6-layer checkpoints at iteration 3 of 10, TP=2 PP=2: Llama (torch_dist), GPT-2 (torch format)."""
    d = tmp_path_factory.mktemp("small")
    for name, flags in (("llama", LLAMA6), ("gpt2", GPT2_6)):
        run = pretrain_job(4, tiny_args(data_dir, **flags, **{"--save": str(d / name)}), d / f"{name}.jsonl")
        assert run.returncode == 0, run.output
    return d


def _grow(src, dst, op, *extra):
    return megagrow("checkpoint", "grow", "--load", str(src), "--save", str(dst), "--op", op, "--quiet", *extra)


@pytest.mark.slow
@pytest.mark.parametrize("op,layers,extra", [
    ("stack:g=2", None, ["--target-tp", "1", "--target-pp", "4"]),                      # chunk copy path
    ("lag:p=2,b=1,init=dup", "9", ["--target-pp", "3", "--rechunk"]),                   # streaming torch_dist
    ("lag:p=3,b=3,init=random", "9", ["--target-tp", "1", "--target-pp", "1", "--ckpt-format", "torch"]),
])
def test_grown_layers_tensor_by_tensor(small, tmp_path, op, layers, extra):
    from megagrow.checkpoint.io import open_checkpoint
    out = tmp_path / "grown"
    _grow(small / "llama", out, op, *(["--num-layers", layers] if layers else []), *extra)
    src, grown = open_checkpoint(str(small / "llama")), open_checkpoint(str(out))
    plan = depth_plan(op, 6, int(layers) if layers else None)
    assert grown.num_layers == len(plan) and grown.iteration == 3 and grown.optimizer.step == src.optimizer.step
    sources = [src.read_layer(i) for i in range(6)]
    for i, new in enumerate(plan):
        unit = grown.read_layer(i)
        assert set(unit) == {"model", "exp_avg", "exp_avg_sq"}
        if new.init == "copy":  # weights and Adam moments are the source layer's, exactly
            for state, tensors in sources[new.source].items():
                for name, t in tensors.items():
                    assert torch.equal(unit[state][name], t), (i, state, name)
        else:  # a fresh layer: new weights, zero moments
            qkv = unit["model"]["self_attention.linear_qkv.weight"]
            assert all(not torch.equal(qkv, s["model"]["self_attention.linear_qkv.weight"]) for s in sources)
            assert 0.01 < qkv.std().item() < 0.03
            assert all(t.abs().sum() == 0 for t in unit["exp_avg"].values())
    g_src, g_new = src.read_globals(), grown.read_globals()
    for state in g_src:
        for name, t in g_src[state].items():
            assert torch.equal(g_new[state][name], t)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_function_preserving_operators_keep_logits(small, tmp_path, family):
    reference = logits(small / family, 4, tmp_path)
    for op, layers, extra, nproc in (("zero", "8", ["--target-tp", "1", "--target-pp", "4"], 4),
                                     ("redundant", "9", ["--target-pp", "3", "--target-tp", "1"], 3)):
        out = tmp_path / f"{family}_{op}"
        _grow(small / family, out, op, "--num-layers", layers, *extra)
        got = logits(out, nproc, tmp_path)
        assert (got - reference).abs().max().item() <= 1e-5, op


@pytest.mark.slow
def test_training_resumes_from_a_grown_checkpoint(data_dir, small, tmp_path):
    out = tmp_path / "stacked"
    _grow(small / "llama", out, "stack:g=2")
    run = pretrain_job(4, tiny_args(data_dir, **{**LLAMA6, "--num-layers": "12", "--exit-interval": None,
                                             "--load": str(out), "--save": str(out)}), tmp_path / "m.jsonl")
    assert run.returncode == 0, run.output
    losses = run.losses()
    assert sorted(losses) == list(range(4, 11))
    assert losses[10] < losses[4]
    assert open(out / "latest_checkpointed_iteration.txt").read() == "10"


def test_grow_refuses_bad_input_in_one_line(small, tmp_path):
    out = tmp_path / "o"
    for argv, needle in [(["--op", "lag:p=1,b=2"], "needs --num-layers"),
                         (["--op", "lag:p=1,b=2", "--num-layers", "9"], "b=2 does not divide k=3"),
                         (["--op", "bogus", "--num-layers", "9"], "unknown operator"),
                         (["--op", "zero", "--num-layers", "5"], "must exceed"),
                         (["--op", "stack:g=2", "--target-pp", "5"], "12 layers do not split into 5"),
                         (["--op", "stack:g=2", "--target-tp", "3"], "not divisible by tensor parallel size 3"),
                         (["--op", "stack:g=2", "--num-layers", "12", "--hidden-size", "128"], "two steps"),
                         (["--op", "fpi", "--hidden-size", "96"], "not a whole multiple of 64"),
                         (["--op", "zero", "--hidden-size", "32"], "cannot shrink"),
                         (["--op", "zero", "--num-attention-heads", "12"], "must keep 2 heads per query group"),
                         (["--op", "nope", "--hidden-size", "128"], "unknown width operator")]:
        res = megagrow("checkpoint", "grow", "--load", str(small / "llama"), "--save", str(out), *argv, check=False)
        lines = res.stderr.strip().splitlines()
        assert res.returncode == 1 and len(lines) == 1 and needle in lines[0], (argv, res.stderr)
        assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


@pytest.mark.slow
def test_redundant_layers_wake_up_in_training(data_dir, small, tmp_path):
    """Paper 002's identity layers must train: with GeLU every new-layer tensor moves after two steps.
    (With SwiGLU the zero pre-MLP norm starves the FFN; `grow` warns and `zero` is the variant to use.)"""
    from megagrow.checkpoint.io import open_checkpoint
    out = tmp_path / "redundant"
    _grow(small / "gpt2", out, "redundant", "--num-layers", "9", "--target-tp", "1", "--target-pp", "1",
          "--ckpt-format", "torch_dist")
    before = open_checkpoint(str(out)).read_layer(2)["model"]  # I2: the first inserted layer
    run = pretrain_job(1, tiny_args(data_dir, **{**GPT2_6, "--num-layers": "9", "--tensor-model-parallel-size": "1",
                                             "--pipeline-model-parallel-size": "1", "--ckpt-format": "torch_dist",
                                             "--exit-interval": None, "--train-iters": "5", "--load": str(out),
                                             "--save": str(out)}), tmp_path / "r.jsonl")
    assert run.returncode == 0, run.output
    after = open_checkpoint(str(out)).read_layer(2)["model"]
    assert before["self_attention.linear_qkv.layer_norm_weight"].abs().sum() == 0
    for name, t in before.items():
        assert not torch.equal(t, after[name]), f"{name} of the inserted layer did not train"


WIDE = ["--hidden-size", "128", "--ffn-hidden-size", "384", "--num-attention-heads", "16", "--num-query-groups", "8"]


@pytest.mark.slow
def test_width_growth_keeps_logits_and_scales_moments(small, tmp_path):
    from megagrow.checkpoint.io import open_checkpoint
    reference = logits(small / "llama", 4, tmp_path)
    fpi, zero = tmp_path / "fpi", tmp_path / "zero"
    _grow(small / "llama", fpi, "fpi", *WIDE, "--target-tp", "4", "--target-pp", "1")
    _grow(small / "llama", zero, "zero", "--hidden-size", "96", "--ffn-hidden-size", "256",
          "--num-attention-heads", "12", "--num-query-groups", "6", "--target-tp", "2", "--target-pp", "1")
    for root in (fpi, zero):
        assert (logits(root, 2 if root == zero else 4, tmp_path) - reference).abs().max().item() <= 1e-5, root
    # Net2Net moments: duplicated units copy them, weights divided by 2 carry m/2 and v/4.
    old, new = open_checkpoint(str(small / "llama")).read_layer(1), open_checkpoint(str(fpi)).read_layer(1)
    fc2 = "mlp.linear_fc2.weight"
    assert torch.allclose(new["exp_avg"][fc2][:64, 192:], old["exp_avg"][fc2] / 2)
    assert torch.allclose(new["exp_avg_sq"][fc2][64:, :192], old["exp_avg_sq"][fc2] / 4)
    assert torch.equal(new["exp_avg"]["mlp.linear_fc1.weight"][384:576, :64], old["exp_avg"]["mlp.linear_fc1.weight"][192:, :64] / 2)


@pytest.mark.slow
def test_width_growth_of_a_tied_layernorm_model_and_training_after(data_dir, small, tmp_path):
    """GPT-2: fpi grows FFN and heads exactly; tied embeddings refuse an fpi hidden growth; training resumes."""
    reference = logits(small / "gpt2", 4, tmp_path)
    out = tmp_path / "gpt2_fpi"
    _grow(small / "gpt2", out, "fpi", "--ffn-hidden-size", "512", "--num-attention-heads", "8")
    assert (logits(out, 4, tmp_path) - reference).abs().max().item() <= 1e-5
    res = megagrow("checkpoint", "grow", "--load", str(small / "gpt2"), "--save", str(tmp_path / "x"), "--op", "fpi",
                   "--hidden-size", "128", check=False)
    assert res.returncode == 1 and "tied embeddings" in res.stderr
    # Heads grow in number, not size: the grown model states its head size (--kv-channels 16).
    wider = {**GPT2_6, "--ffn-hidden-size": "512", "--num-attention-heads": "8", "--exit-interval": None}
    run = pretrain_job(4, tiny_args(data_dir, **wider, **{"--load": str(out)}), tmp_path / "w0.jsonl")
    assert run.returncode != 0 and "checkpoint has --kv-channels 16" in run.output
    run = pretrain_job(4, tiny_args(data_dir, **wider, **{"--kv-channels": "16", "--load": str(out)}), tmp_path / "w.jsonl")
    assert run.returncode == 0, run.output
    losses = run.losses()
    assert sorted(losses) == list(range(4, 11)) and losses[10] < losses[4]


def test_mask_schedules_follow_the_papers():
    from megagrow.model.growth_masks import mask_values
    # pdg, eq. 5-6: 4 -> 10 dims over iterations 10..13: r = floor(6/3) = 2 dims per step, all open at G_e.
    assert mask_values("pdg", 4, 10, 10, 13, 10).tolist() == [1] * 4 + [0] * 6
    assert mask_values("pdg", 4, 10, 10, 13, 12).tolist() == [1] * 8 + [0] * 2
    assert mask_values("pdg", 4, 10, 10, 13, 13).tolist() == [1] * 10
    assert mask_values("pdg", 2, 4, 0, 4, 1).tolist() == [1, 1, 0, 0]  # fewer new than steps: evenly
    assert mask_values("pdg", 2, 4, 0, 4, 2).tolist() == [1, 1, 1, 0]
    # msg: every new index ramps together.
    assert mask_values("msg", 2, 4, 10, 14, 11).tolist() == [1, 1, 0.25, 0.25]


@pytest.mark.slow
def test_masked_and_upper_layer_width_growth(data_dir, small, tmp_path):
    """msg/pdg at mask 0 keep the logits (Llama: RMSNorm, GQA, SwiGLU; GPT-2: LayerNorm, tied, torch format);
    aki takes new units from the layer above; training opens the masks and drops them when open."""
    from megagrow.checkpoint.io import open_checkpoint
    for family, op, sizes, layout in [
        ("llama", "pdg:steps=4", ["--hidden-size", "96", "--ffn-hidden-size", "256", "--num-attention-heads", "12",
                                   "--num-query-groups", "6"], ["--target-tp", "2", "--target-pp", "1"]),
        ("gpt2", "msg:steps=4", ["--hidden-size", "128", "--ffn-hidden-size", "384", "--num-attention-heads", "8"],
         ["--target-tp", "1", "--target-pp", "2"]),
    ]:
        out = tmp_path / f"{family}_{op[:3]}"
        res = _grow(small / family, out, op, *sizes, *layout)
        assert res.returncode == 0, res.stderr
        reference = logits(small / family, 4, tmp_path)
        assert (logits(out, 2, tmp_path) - reference).abs().max().item() <= 1e-5, op
    grown = open_checkpoint(str(tmp_path / "llama_pdg"))
    assert grown.run_state["growth_masks"] == {"kind": "pdg", "begin": 3, "end": 7, "hidden_size": 64,
                                                "ffn_hidden_size": 192, "num_attention_heads": 8}
    res = megagrow("checkpoint", "grow", "--load", str(tmp_path / "llama_pdg"), "--save", str(tmp_path / "again"),
                   "--op", "stack:g=2", check=False)
    assert res.returncode == 1 and "still opening" in res.stderr

    aki = tmp_path / "aki"
    assert _grow(small / "llama", aki, "aki", "--ffn-hidden-size", "256").returncode == 0
    src, new = open_checkpoint(str(small / "llama")), open_checkpoint(str(aki))
    fc1 = "mlp.linear_fc1.weight"
    lower, upper, grown_fc1 = src.read_layer(1), src.read_layer(2), new.read_layer(1)
    assert torch.equal(grown_fc1["model"][fc1][:192], lower["model"][fc1][:192])        # old gate rows kept
    assert torch.equal(grown_fc1["model"][fc1][192:256], upper["model"][fc1][:64])     # new gate rows: layer above
    assert torch.equal(grown_fc1["exp_avg"][fc1][192:256], upper["exp_avg"][fc1][:64])
    # random (G_random): new entries at the trained tensor's scale, unlike direct's initial scale.
    for op in ("random", "direct"):
        assert _grow(small / "llama", tmp_path / op, op, "--ffn-hidden-size", "256").returncode == 0
    w = {op: open_checkpoint(str(tmp_path / op)).read_layer(1)["model"]["mlp.linear_fc2.weight"] for op in
         ("random", "direct")}
    old_std = lower["model"]["mlp.linear_fc2.weight"].std().item()
    assert torch.equal(w["random"][:, :192], w["direct"][:, :192])
    assert w["random"][:, 192:].std().item() == pytest.approx(old_std, rel=0.15)
    assert w["direct"][:, 192:].std().item() != pytest.approx(old_std, rel=0.15)

    # Train through the opening (iterations 4..7) and on: the masks are removed, the loss falls.
    wide = {**LLAMA6, "--hidden-size": "96", "--ffn-hidden-size": "256", "--num-attention-heads": "12",
            "--num-query-groups": "6", "--kv-channels": "8", "--tensor-model-parallel-size": "2",
            "--pipeline-model-parallel-size": "1", "--exit-interval": None, "--load": str(tmp_path / "llama_pdg"),
            "--save": str(tmp_path / "llama_pdg")}
    run = pretrain_job(2, tiny_args(data_dir, **wide), tmp_path / "pdg.jsonl")
    assert run.returncode == 0, run.output
    assert "growth masks (pdg)" in run.output and "fully open at iteration 7" in run.output
    losses = run.losses()
    assert sorted(losses) == list(range(4, 11)) and losses[10] < losses[4]
    assert open_checkpoint(str(tmp_path / "llama_pdg")).run_state["growth_masks"] is None


def test_learn_refuses_bad_input_in_one_line(small, tmp_path, capsys):
    """In process (no interpreter start per case), except the data check, which starts torch.distributed."""
    from megagrow.cli import main
    out = tmp_path / "o"
    grow = ["checkpoint", "grow", "--load", str(small / "llama"), "--save", str(out)]
    for argv, needle in [(["--op", "learn", "--num-layers", "12"], "give the number of fitting steps"),
                         (["--op", "learn:steps=0", "--num-layers", "12"], "steps=0 must be at least 1"),
                         (["--op", "learn:steps=5,lr=fast", "--num-layers", "12"], "lr='fast' is not a number"),
                         (["--op", "learn:steps=5,g=2", "--num-layers", "12"], "unknown parameter g"),
                         (["--op", "learn:steps=5"], "learn needs --num-layers"),
                         (["--op", "learn:steps=5,mode=x", "--ffn-hidden-size", "256"], "unknown parameter mode"),
                         (["--op", "learn:steps=5", "--num-layers", "9"], "9 layers do not split into 2"),
                         (["--op", "stack:g=2", "--data-path", "x"], "--data-path is read only by --op learn")]:
        assert main(grow + argv) == 1, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (argv, lines)
    res = megagrow(*grow, "--op", "learn:steps=2", "--num-layers", "12", "--data-path", str(tmp_path / "none"),
                   check=False)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and "cannot read the training data" in lines[0], res.stderr
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".partial")


@pytest.mark.slow
def test_learned_growth_fits_its_maps_and_trains_on(data_dir, small, tmp_path):
    """G_learn (LiGO): width maps start as fpi's; fitting lowers the grown model's held-out loss; Adam moments
    go through the fitted linear map (second moments through its squared entries); the grown model trains on."""
    import json
    from megagrow.checkpoint.io import open_checkpoint
    from megagrow.growth.learn import LearnedGrowth
    src = open_checkpoint(str(small / "llama"))
    old = [src.read_layer(j) for j in range(6)]

    # Before fitting, the width maps are fpi's: the same weights and moments (whole multiples of every size).
    fpi = tmp_path / "fpi"
    _grow(small / "llama", fpi, "fpi", *WIDE, "--target-tp", "1", "--target-pp", "1")
    fpi_view = open_checkpoint(str(fpi))
    names = list(old[0]["model"])
    start = plan_growth("learn:steps=1", ModelShape.from_args(src.args), ModelShape.from_args(fpi_view.args)).start
    initial = LearnedGrowth(names, [], 6, None, start)
    want = fpi_view.read_layer(2)
    for state, power in (("model", 1), ("exp_avg", 1), ("exp_avg_sq", 2)):
        for name in names:
            stacked = torch.stack([u[state][name] for u in old])
            assert torch.allclose(initial.grow(name, stacked, power, layer=2), want[state][name], atol=1e-7), name

    # Depth 6 -> 12: the loss falls while fitting; the moments follow the learned layer mix.
    deep = tmp_path / "learn_deep"
    res = _grow(small / "llama", deep, "learn:steps=20,lr=1e-2", "--num-layers", "12")
    assert "learn: step 20/20" in res.stderr
    record = json.load(open(deep / "learned_growth.json"))
    assert len(record["train_loss"]) == 20 and record["heldout_loss_after"] < record["heldout_loss_before"]
    mix = torch.load(deep / "learned_growth.pt")["depth.mlp__linear_fc2__weight"]  # 12 x 6
    assert mix.shape == (12, 6) and mix[7].argmax() == 1 and 0 < (mix[7] - torch.eye(6)[1]).abs().max() < 0.5
    grown = open_checkpoint(str(deep))
    new, fc2 = grown.read_layer(7), "mlp.linear_fc2.weight"
    for state, power in (("model", 1), ("exp_avg", 1), ("exp_avg_sq", 2)):
        by_hand = sum(mix[7, j] ** power * old[j][state][fc2] for j in range(6))
        assert torch.allclose(new[state][fc2], by_hand, rtol=1e-5, atol=1e-8), state
    assert torch.equal(grown.read_globals()["model"]["output_layer.weight"], src.read_globals()["model"][
        "output_layer.weight"])  # depth growth leaves the globals as they are

    # The grown checkpoint resumes in the trainer at 12 layers, TP=2 PP=2, and its loss falls.
    run = pretrain_job(4, tiny_args(data_dir, **{**LLAMA6, "--num-layers": "12", "--exit-interval": None,
                                             "--load": str(deep), "--save": str(deep)}), tmp_path / "d.jsonl")
    assert run.returncode == 0, run.output
    losses = run.losses()
    assert sorted(losses) == list(range(4, 11)) and losses[10] < losses[4]

    # Width 64 -> 96, FFN 192 -> 256, 8 -> 12 heads (not whole multiples): the fitted maps apply to the moments.
    wide = tmp_path / "learn_wide"
    _grow(small / "llama", wide, "learn:steps=20,lr=1e-2", "--hidden-size", "96", "--ffn-hidden-size", "256",
          "--num-attention-heads", "12", "--num-query-groups", "6", "--target-pp", "1")
    record = json.load(open(wide / "learned_growth.json"))
    assert record["heldout_loss_after"] < record["heldout_loss_before"]
    assert sum(record["train_loss"][-5:]) < sum(record["train_loss"][:5])
    maps = torch.load(wide / "learned_growth.pt")
    rows, cols = maps["width.hidden_writes"], maps["width.units_reads"]  # 96 x 64, 256 x 192
    new = open_checkpoint(str(wide)).read_layer(1)
    for state, power in (("model", 1), ("exp_avg", 1), ("exp_avg_sq", 2)):
        by_hand = rows ** power @ old[1][state][fc2] @ (cols ** power).T
        assert torch.allclose(new[state][fc2], by_hand, rtol=1e-4, atol=1e-7), state
    run = pretrain_job(2, tiny_args(data_dir, **{**LLAMA6, "--hidden-size": "96", "--ffn-hidden-size": "256",
                                             "--num-attention-heads": "12", "--num-query-groups": "6",
                                             "--kv-channels": "8", "--pipeline-model-parallel-size": "1",
                                             "--train-iters": "6", "--exit-interval": None, "--load": str(wide)}),
                   tmp_path / "w.jsonl")
    assert run.returncode == 0, run.output
    losses = run.losses()
    assert sorted(losses) == [4, 5, 6] and losses[6] < losses[4]


LLAMA2 = ModelShape(num_layers=2, hidden_size=64, num_attention_heads=8, num_query_groups=4, group_query_attention=True,
                    swiglu=True, normalization="RMSNorm", untie_embeddings_and_output_weights=True)
GPT2_2 = ModelShape(num_layers=2, hidden_size=64, num_attention_heads=4)  # LayerNorm, tied embeddings


def test_check_growth_needs_no_checkpoint():
    from megagrow.growth.registry import check_growth
    wide = LLAMA2.with_sizes(hidden_size=128, ffn_hidden_size=384, num_attention_heads=16, num_query_groups=8)
    for spec, new in [("stack:g=3", LLAMA2.with_sizes(num_layers=6)), ("stack", LLAMA2.with_sizes(num_layers=6)),
                      ("partial:12-2", LLAMA2.with_sizes(num_layers=3)), ("lag:last", LLAMA2.with_sizes(num_layers=3)),
                      ("zero", LLAMA2.with_sizes(num_layers=3)), ("learn:steps=5", LLAMA2.with_sizes(num_layers=4)),
                      ("fpi", wide), ("zero", wide), ("msg:steps=4", wide), ("learn:steps=5,lr=0.01", wide),
                      ("aki", LLAMA2.with_sizes(ffn_hidden_size=256))]:
        check_growth(spec, LLAMA2, new)
    for spec, old, new, needle in [
        ("stack:g=4", LLAMA2, LLAMA2.with_sizes(num_layers=6), "makes 8 layers, not --num-layers 6"),
        ("stack:g=2", LLAMA2, LLAMA2, "makes num layers 4, not 2"),
        ("bogus", LLAMA2, LLAMA2.with_sizes(num_layers=4), "unknown operator 'bogus'"),
        ("bogus", LLAMA2, wide, "unknown width operator"),
        ("stack:g=x", LLAMA2, LLAMA2.with_sizes(num_layers=4), "g='x' is not an integer"),
        ("stack:h=2", LLAMA2, LLAMA2.with_sizes(num_layers=4), "unknown parameter h"),
        ("redundant:x", LLAMA2, LLAMA2.with_sizes(num_layers=3), "unknown parameter x"),
        ("fpi", LLAMA2, LLAMA2.with_sizes(num_layers=4), "fpi grows width, not depth"),
        ("stack:g=2", LLAMA2, wide, "stack grows depth, not width"),
        ("stack:g=2", LLAMA2, wide.with_sizes(num_layers=4), "two steps"),
        ("partial:1", LLAMA2, LLAMA2, "cannot shrink or keep depth"),
        ("lag:p=3,b=1", LLAMA2, LLAMA2.with_sizes(num_layers=3), "p=3 is out of range"),
        ("fpi", LLAMA2, LLAMA2.with_sizes(hidden_size=96), "not a whole multiple of 64"),
        ("fpi", GPT2_2, GPT2_2.with_sizes(hidden_size=128), "tied embeddings"),
        ("zero", GPT2_2, GPT2_2.with_sizes(hidden_size=128), "needs RMSNorm"),
        ("zero", LLAMA2, LLAMA2.with_sizes(hidden_size=32), "cannot shrink"),
        ("direct", LLAMA2, LLAMA2.with_sizes(num_attention_heads=12), "must keep 2 heads per query group"),
        ("msg", LLAMA2, wide, "give the iterations"),
        ("learn", LLAMA2, wide, "give the number of fitting steps"),
        ("learn:steps=5,g=2", LLAMA2, LLAMA2.with_sizes(num_layers=4), "unknown parameter g"),
    ]:
        with pytest.raises(GrowthError, match=needle) as raised:
            check_growth(spec, old, new)
        assert "\n" not in str(raised.value), spec


def test_an_operator_registered_in_a_test_grows_a_checkpoint(small, tmp_path, capsys):
    """A toy depth operator: its class and one registration line; the CLI grows with it and lists it."""
    from megagrow.checkpoint.io import open_checkpoint
    from megagrow.cli import main
    from megagrow.growth.depth import DepthOperator
    from megagrow.growth.registry import OPERATORS

    class Mirror(DepthOperator):
        name, preserves_function = "toy", False
        summary = "the layers, then again in reverse order (1..L L..1)"

        def layers(self, params, old, target):
            return [NewLayer(i) for i in [*range(old), *reversed(range(old))]]

    OPERATORS.register("toy", Mirror())
    try:
        assert main(["ops", "list"]) == 0
        rows = [line.split() for line in capsys.readouterr().out.splitlines()]
        assert any(row[:3] == ["toy", "depth", "no"] and "reverse" in row for row in rows)
        out = tmp_path / "toy"
        grow = ["checkpoint", "grow", "--load", str(small / "llama"), "--save", str(out), "--quiet"]
        assert main(grow + ["--op", "toy:x=1"]) == 1
        assert "toy: unknown parameter x" in capsys.readouterr().err
        assert main(grow + ["--op", "toy", "--target-tp", "1", "--target-pp", "1", "--ckpt-format", "torch"]) == 0
        printed = capsys.readouterr().out
        assert "layers: 1 2 3 4 5 6 6 5 4 3 2 1" in printed
        assert "connection rate R_c: 0.455" in printed  # 5 of its 11 adjacent pairs were adjacent before
        assert f"wrote {out}" in printed
    finally:
        OPERATORS.unregister("toy")
    assert "toy" not in OPERATORS
    src, grown = open_checkpoint(str(small / "llama")), open_checkpoint(str(out))
    assert grown.num_layers == 12 and grown.format == "torch" and grown.iteration == 3
    for i, j in enumerate([0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0]):
        unit, source = grown.read_layer(i), src.read_layer(j)
        assert set(unit) == set(source) == {"model", "exp_avg", "exp_avg_sq"}
        for state, tensors in source.items():
            for name, t in tensors.items():
                assert torch.equal(unit[state][name], t), (i, state, name)
