"""Growth timing: the G_stack formula, plans and their FLOPs, and every policy on curves with a known answer."""

import math

import pytest
import yaml

from conftest import run_tool, write_indexed

from megagrow.scheduling.plan import describe, dump_plan, load_plan, make_plan
from megagrow.scheduling.timing import LossLaw, PlanError, StopRule, fit_loss_law, gstack_small_tokens, slope
from megagrow.model.shape import num_floating_point_operations

LLAMA7B = {"num_layers": 32, "hidden_size": 4096, "ffn_hidden_size": 11008, "num_attention_heads": 32,
           "swiglu": True, "normalization": "RMSNorm", "untie_embeddings_and_output_weights": True,
           "disable_bias_linear": True}
TRAINING = {"global_batch_size": 1024, "micro_batch_size": 1, "seq_length": 4096, "lr": 3e-4}


def test_gstack_formula_by_hand():
    # log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74, the notes' worked example: N = 7e9, D = 2e12.
    n, c = 7e9, 6 * 7e9 * 2e12
    by_hand = 10 ** (0.88 * 9.845098 + 163.27 / 22.924279 - 5.74)
    assert gstack_small_tokens(n, c) == pytest.approx(by_hand, rel=1e-5)
    assert gstack_small_tokens(n, c) == pytest.approx(11.1e9, rel=0.01)
    # 1B parameters on 20B tokens: the formula asks for more than the whole budget (it extrapolates badly).
    assert gstack_small_tokens(1e9, 6 * 1e9 * 20e9) > 20e9


def test_megatron_flops_formula_gqa_and_swiglu():
    from argparse import Namespace
    a = Namespace(num_layers=2, hidden_size=8, ffn_hidden_size=16, num_attention_heads=4, num_query_groups=2,
                  group_query_attention=True, kv_channels=2, swiglu=True, seq_length=4, padded_vocab_size=32)
    # per token and layer: QKV 8*(4+2+2)*2... written out as Megatron's expression, by hand:
    by_hand = 12 * 3 * 4 * 2 * 64 * ((1 + 0.5 + 0.5) * 1 + 2 * 1.5 + 32 / 32)
    assert num_floating_point_operations(a, 3) == pytest.approx(by_hand)


def test_plan_reproduces_the_formula_and_refuses_impossible_targets(tmp_path):
    plan = make_plan(LLAMA7B, 32000, TRAINING, {"vocab_size": 32000, "tokenizer_type": "NullTokenizer"},
                     tokens=2e12, growth_factor=4)
    small, target = plan.stages
    assert plan.model_args(small).num_layers == 8 and target.grow == {"op": "stack:g=4"}
    ev = small.stop["evidence"]
    n = plan.parameters()
    assert ev["N"] == n and ev["C"] == pytest.approx(6 * n * plan.budget["target_scratch_tokens"])
    assert small.stop["iteration"] == round(gstack_small_tokens(n, ev["C"]) / (1024 * 4096))
    assert plan.budget["flops"] == pytest.approx(math.ceil(2e12 / (1024 * 4096)) * plan.step_flops())
    assert "stage" in describe(plan) and "stack:g=4" in describe(plan)
    # planned FLOPs add up to the budget
    used = sum(i * plan.step_flops(s) for s, i in zip(plan.stages, plan.planned_iterations()))
    assert used <= plan.budget["flops"] and used > 0.999 * plan.budget["flops"]
    path = tmp_path / "p.yaml"
    path.write_text(dump_plan(plan))
    assert dump_plan(load_plan(str(path))) == dump_plan(plan)
    for kwargs, needle in [({"growth_factor": 3}, "must be >= 2 and divide"), ({"stages": 1}, "at least 2 stages"),
                           ({"stages": 40}, "cannot each add layers"), ({}, "give the budget")]:
        with pytest.raises(PlanError, match=needle):
            make_plan(LLAMA7B, 32000, TRAINING, {}, **({"tokens": 2e12} if kwargs else {}), **kwargs)
    # gradual: +k layers per stage
    gradual = make_plan(LLAMA7B, 32000, TRAINING, {}, tokens=2e12, stages=4, op="last")
    assert [plan_layers(gradual, s) for s in gradual.stages] == [8, 16, 24, 32]


def plan_layers(plan, stage):
    return plan.model_args(stage).num_layers


def test_plan_cli_and_bad_plans(tmp_path):
    out = run_tool("-m", "megagrow.cli", "plan", "--train-tokens", "2e12", "--num-layers", "32", "--hidden-size",
                   "4096", "--num-attention-heads", "32", "--seq-length", "4096", "--global-batch-size", "1024",
                   "--vocab-size", "32000", "--growth-factor", "5", "--output", str(tmp_path / "p.yaml"), check=False)
    assert out.returncode == 1 and "divide the target's 32 layers" in out.stderr and "outside 2..4" in out.stderr
    out = run_tool("-m", "megagrow.cli", "demo", "--data", str(tmp_path / "missing.jsonl"), "--output",
                   str(tmp_path / "demo"), check=False)
    assert out.returncode == 1 and "corpus not found" in out.stderr
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"target": {}, "stages": []}))
    out = run_tool("-m", "megagrow.cli", "run", str(tmp_path / "bad.yaml"), check=False)
    assert out.returncode == 1 and "budget: missing" in out.stderr and len(out.stderr.splitlines()) == 1


def test_converge_fires_where_the_slope_flattens():
    # loss = 3 + 2 exp(-i/20): slope -0.1 exp(-i/20), under 1e-3 from i = 20 ln 100 = 92.1
    curve = [(i, 3 + 2 * math.exp(-i / 20), 0.0) for i in range(10, 200, 10)]
    rule = StopRule(policy="converge", threshold=1e-3, window=2, patience=2)
    fired = next(i for k, (i, _, _) in enumerate(curve) if rule.after_evaluation(curve[:k + 1]).stop)
    # chord slopes over [i-10, i]: [80, 90] = 0.2 (e^-4.5 - e^-4) = -1.44e-3, [90, 100] = -8.7e-4: first under
    # the threshold at 100, the second in a row at 110.
    assert fired == 110
    assert slope([0, 1, 2], [3, 2, 1]) == pytest.approx(-1)


def test_ecr_fires_when_the_conversion_rate_drops_below_the_flops_ratio():
    # Large model: L_t(n) = 4 n^-0.5 + 2. Small: L_s(n) = 8 n^-0.5 + 2.5. With x = n^-0.5, V solves
    # 4 V^-0.5 + 2 = L_s, so V^-0.5 = 2x + 0.125 and E = L_s'(n) / L_t'(V) = 2 x^3 / (2x + 0.125)^3.
    # E = 0.1 where x / (2x + 0.125) = 0.05^(1/3): x = 0.125 r / (1 - 2 r), n = x^-2 (about 32.7).
    r = 0.05 ** (1 / 3)
    expected = (0.125 * r / (1 - 2 * r)) ** -2
    curve = [(i, 8 * i ** -0.5 + 2.5) for i in range(1, 200)]
    rule = StopRule(policy="ecr", law={"a": 4.0, "b": 0.5, "c": 2.0}, flops_ratio=0.1, window=3)
    fired = next(i for k, (i, _) in enumerate(curve) if rule.after_evaluation(curve[:k + 1]).stop)
    assert abs(fired - expected) <= 2  # the slope is a 3-point chord ending at the last point, not the derivative
    before = rule.after_evaluation(curve[:fired - 2]).evidence
    assert before["E"] > 0.1 and rule.after_evaluation(curve[:fired]).evidence["E"] < 0.1
    assert LossLaw(4.0, 0.5, 2.0).iterations_to(2 + 4 / 3) == pytest.approx(9)


def test_fixed_policies_and_loss_law_fit():
    assert not StopRule(policy="iters", iteration=10).after_step(9, 0, 1).stop
    assert StopRule(policy="iters", iteration=10).after_step(10, 0, 1).stop
    assert StopRule(policy="flops", flops=100.0).after_step(5, 95.0, 10.0).stop
    assert not StopRule(policy="flops", flops=100.0).after_step(5, 85.0, 10.0).stop
    # tokens: counted from the stage's start, in whole iterations of global batch x sequence
    tokens = StopRule.from_plan({"policy": "tokens", "tokens": 1000}, 64 * 8, start=20)
    assert tokens.iteration == 20 + 2 and tokens.after_step(22, 0, 1).stop and not tokens.after_step(21, 0, 1).stop
    formula = StopRule.from_plan({"policy": "formula", "iteration": 7, "tokens": 1, "evidence": {"N": 1}})
    assert formula.after_step(7, 0, 1).stop and "formula" in formula.after_step(7, 0, 1).reason
    with pytest.raises(PlanError, match="unknown growth-timing policy"):
        StopRule(policy="sometime")
    xs = list(range(10, 500, 10))
    law = fit_loss_law(xs, [5 * x ** -0.4 + 1.5 for x in xs])
    assert (law.a, law.b, law.c) == pytest.approx((5, 0.4, 1.5), rel=1e-3)


def test_wsd_schedule_holds_then_decays_over_its_last_iterations(tmp_path):
    """--lr-decay-style WSD as Megatron-LM: warmup, constant, then the last --lr-wsd-decay-iters decay to min-lr."""
    import torch
    from megagrow.training.arguments import ArgumentError, parse_args
    from megagrow.training.pretrain import _scheduler
    flags = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
             "--micro-batch-size", "1", "--global-batch-size", "2", "--train-iters", "20", "--lr", "1e-3",
             "--min-lr", "1e-4", "--lr-decay-style", "WSD", "--tokenizer-type", "NullTokenizer", "--vocab-size", "64",
             "--data-path", str(tmp_path / "d")]
    write_indexed(tmp_path / "d")
    with pytest.raises(ArgumentError, match="needs --lr-wsd-decay-iters"):
        parse_args(flags, world_size=1)
    args = parse_args(flags + ["--lr-wsd-decay-iters", "5", "--lr-wsd-decay-style", "linear"], world_size=1)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = _scheduler(args, opt)
    lrs = []
    for _ in range(20):
        sched.step(args.global_batch_size)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[:15] == pytest.approx([1e-3] * 15)  # constant until the last 5 iterations
    assert lrs[15] < 1e-3 and lrs[-1] == pytest.approx(1e-4)
    assert all(a > b for a, b in zip(lrs[14:], lrs[15:]))


def test_a_stop_rule_is_one_class_and_one_registration(tmp_path):
    """A toy rule registered here: the plan schema accepts it, the rule decides with its own options."""
    from megagrow.scheduling.plan import load_plan
    from megagrow.scheduling.timing import STOP_RULES, Decision, StopPolicy

    class LossBelow(StopPolicy):  # leave once a validation loss is under options.loss
        def after_evaluation(self, rule, points):
            return Decision(bool(points) and points[-1][1] < rule.options["loss"], "loss-below")

    STOP_RULES.register("loss_below", LossBelow())
    try:
        plan = make_plan(LLAMA7B, 32000, TRAINING, {"vocab_size": 32000, "tokenizer_type": "NullTokenizer"},
                         tokens=2e12, growth_factor=4)
        plan.stages[0].stop = {"policy": "loss_below", "options": {"loss": 3.0}, "max_iteration": 100}
        path = tmp_path / "plan.yaml"
        path.write_text(dump_plan(plan))
        rule = StopRule.from_plan(load_plan(str(path)).stages[0].stop)
        assert not rule.after_evaluation([(1, 3.5)]).stop and rule.after_evaluation([(1, 3.5), (2, 2.9)]).stop
        assert rule.after_step(100, 0.0, 1.0).stop  # max_iteration still applies
    finally:
        STOP_RULES.unregister("loss_below")
    with pytest.raises(PlanError, match="unknown growth-timing policy 'loss_below'"):
        StopRule(policy="loss_below")
