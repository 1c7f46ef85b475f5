"""--freeze-layers: some transformer layers train, the others stay bit-identical (LLaMA-Pro's block expansion:
grow with `zero`, train only the new blocks, unfreeze later).

Frozen layers stay in the optimizer, in the param groups they would have anyway, so every checkpoint carries their
Adam moments (and fp32 main copies) and loads into a stage that freezes other layers or none: megatron-core matches
a checkpoint's param groups to the run's by their hyper-parameters, so a group of their own at lr 0 would not load
into an unfrozen stage. What keeps them still: their gradients are zeroed after the backward pass, and during the
optimizer's step their main parameters are left out of its param groups, so neither the update, weight decay nor
the gradient norm (clipping) sees them and their moments stay as they are. Layers only: the embeddings, the final
norm and the output layer train.
"""

from __future__ import annotations

import contextlib
import re


def parse_layers(spec: str | None, num_layers: int) -> list[int]:
    """`1-3,5` -> [1, 2, 3, 5]: 1-based global layer numbers, as Megatron-LM logs layers; None or `none` -> [].
    ValueError saying what is wrong."""
    if spec is None or spec.strip().lower() == "none":
        return []
    layers = set()
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", part)
        if not m:
            raise ValueError(f"cannot read {part.strip()!r} (expected layer numbers and ranges, e.g. 1-3,5, or none)")
        first, last = int(m[1]), int(m[2] or m[1])
        if not 1 <= first <= last:
            raise ValueError(f"{part.strip()} is not a range of layers (they count from 1)")
        if last > num_layers:
            raise ValueError(f"layer {last} is beyond --num-layers {num_layers}")
        layers.update(range(first, last + 1))
    return sorted(layers)


def layer_ranges(layers) -> str:
    """[1, 2, 3, 5] -> '1-3,5', what --freeze-layers reads; [] -> 'none'."""
    runs: list[list[int]] = []
    for n in sorted(set(layers)):
        if runs and n == runs[-1][1] + 1:
            runs[-1][1] = n
        else:
            runs.append([n, n])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) or "none"


def _main_params(opt, model_params: set[int]) -> list:
    """What `opt`'s torch optimizer steps for these model parameters (ids): the distributed optimizer's fp32 shards
    on this rank, the fp16/bf16 optimizer's fp32 copies, the fp32 parameters themselves."""
    groups = opt.optimizer.param_groups
    if hasattr(opt, "model_param_group_index_map"):
        return [groups[g]["params"][i] for p, (g, i) in opt.model_param_group_index_map.items()
                if id(p) in model_params]
    found = [p for g in groups for p in g["params"] if id(p) in model_params]
    for halves, mains in zip(getattr(opt, "float16_groups", []), getattr(opt, "fp32_from_float16_groups", [])):
        found += [main for half, main in zip(halves, mains) if id(half) in model_params]
    return found


class FrozenLayers:
    """The layers --freeze-layers names, in this rank's model chunks and optimizer (no layers: does nothing)."""

    def __init__(self, model_chunks: list, optimizer, args):
        from megatron.core.transformer.transformer_layer import TransformerLayer
        self.layers = parse_layers(getattr(args, "freeze_layers", None), args.num_layers)
        wanted = set(self.layers)
        self.params = [p for chunk in model_chunks for m in chunk.modules()
                       if isinstance(m, TransformerLayer) and m.layer_number in wanted for p in m.parameters()]
        ids = {id(p) for p in self.params}
        self.optimizers = [(opt.optimizer, {id(p) for p in _main_params(opt, ids)})
                           for opt in getattr(optimizer, "chained_optimizers", [optimizer])
                           if getattr(opt, "optimizer", None) is not None and self.params]
        for inner, frozen in self.optimizers:
            _initialize_state(inner, frozen)

    def zero_grads(self) -> None:
        """After the backward pass: nothing of theirs reaches a check or the step (DDP keeps them in main_grad)."""
        for p in self.params:
            p.main_grad.zero_()

    @contextlib.contextmanager
    def left_out(self):
        """Around the optimizer's step: the frozen main parameters out of its param groups."""
        kept = [(group, group["params"]) for inner, _ in self.optimizers for group in inner.param_groups]
        for inner, frozen in self.optimizers:
            for group in inner.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in frozen]
        idle = [id(group) for group, params in kept if params and not group["params"]]
        try:
            yield
        finally:
            for group, params in kept:
                group["params"] = params
            for inner, frozen in self.optimizers:
                _follow_step(inner, frozen, idle)


def _follow_step(inner, frozen: set[int], idle: list[int]) -> None:
    """megatron-core saves one Adam step for all parameters (it asserts they agree): the frozen ones' count on with
    the others'. torch's Adam keeps one per parameter; Apex's and TE's one per group, which does not step when all
    of its parameters were left out (`idle`)."""
    step = next((s["step"] for p, s in inner.state.items() if id(p) not in frozen and "step" in s), None)
    for p, s in inner.state.items() if step is not None else ():
        if id(p) in frozen and "step" in s:
            s["step"] = step.clone() if hasattr(step, "clone") else step  # a tensor of its own, as after a load
    steps = [g["step"] for g in inner.param_groups if "step" in g and id(g) not in idle]
    for g in inner.param_groups if steps else ():
        if id(g) in idle:
            g["step"] = steps[0]


def _initialize_state(inner, frozen: set[int]) -> None:
    """Frozen parameters without optimizer state (a fresh run, or a checkpoint saved without it) get what one step of
    lr 0 on zero gradients gives them, zero moments, and stay as they are (lr 0, weight decay 0): a checkpoint
    without their state would not load into a stage that unfreezes them."""
    fresh = [p for g in inner.param_groups for p in g["params"] if id(p) in frozen and not inner.state.get(p)]
    if not fresh:
        return
    ids, saved = {id(p) for p in fresh}, [dict(g) for g in inner.param_groups]
    for g in inner.param_groups:
        g.update(params=[p for p in g["params"] if id(p) in ids], lr=0.0, weight_decay=0.0)
    for p in fresh:
        p.grad = p.new_zeros(p.shape)
    inner.step()
    for g, before in zip(inner.param_groups, saved):  # also drops a group step Apex's or TE's Adam adds
        g.clear()
        g.update(before)
    for p in fresh:
        p.grad = None
