"""G_learn: LiGO-style learned linear growth (Wang et al. 2023, "Learning to Grow Pretrained Models").

Every grown parameter is a linear function of the small model's parameters of the same name:
    W'_i = E_out (sum_j D_ij W_j) E_in^T
D (per name, L' x L) mixes the small model's layers; a width matrix per axis map of growth.width and
per role (writing or reading that axis), shared by all layers, expands each dimension. They start as
known operators: D as stacking's one-hot plan (new layer i = old layer i mod L), E as fpi's duplication
(divided where a weight reads a duplicated axis). A dimension that does not grow keeps a fixed
identity and learns nothing. `fit` trains only the maps, by the large model's language-model loss
on training data (small weights frozen); `LearnedGrownView` then writes the result once. Adam state
goes through the same map: first moments and fp32 main copies with its entries, second moments with
their squares (a one-hot or divided map thus copies or scales them exactly as stack/fpi do).
Any new layer may mix every old one, so the small checkpoint (with its optimizer state) is held in memory.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import sys
from dataclasses import dataclass

import torch

from megagrow.checkpoint.view import CheckpointView, DerivedView, Unit, check_target_parallelism
from megagrow.model.shape import expected_shapes
from megagrow.growth.depth import DepthOperator, LayerPlan, NewLayer
from megagrow.growth.operators import GrowthError, Plan
from megagrow.growth.width import WidthOperator, WidthPlan

DEFAULT_LR = 1e-3  # map entries start at 0 or 1: Adam moves them by about lr per step
_VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")
_GLOBAL_PREFIXES = ("embedding.", "decoder.", "output_layer.")  # layer names are relative: self_attention., mlp.


def learn_params(params: dict) -> tuple[int, float]:
    """(steps, lr) from a learn spec's parameters (their names already checked); one-line errors."""
    try:
        steps = int(params.get("steps", ""))
    except ValueError:
        raise GrowthError("learn: give the number of fitting steps, e.g. learn:steps=200") from None
    if steps < 1:
        raise GrowthError(f"learn: steps={steps} must be at least 1")
    try:
        lr = float(params.get("lr", DEFAULT_LR))
    except ValueError:
        raise GrowthError(f"learn: lr={params['lr']!r} is not a number") from None
    if not lr > 0:
        raise GrowthError(f"learn: lr={lr:g} must be positive")
    return steps, lr


def _key(name: str) -> str:
    return name.replace(".", "__")  # module attribute names cannot hold dots


def _map_key(axis: str | None, reads: bool) -> str:  # one width matrix per axis map and role
    return f"{axis}_{'reads' if reads else 'writes'}"


class LearnedGrowth(torch.nn.Module):
    """The expansion maps. `sources`: D's one-hot start (None: depth does not grow);
    `width`: a growth.width.WidthPlan with duplicating maps (None: width does not grow)."""

    def __init__(self, layer_names: list[str], global_names: list[str], old_layers: int,
                 sources: list[int] | None, width=None):
        super().__init__()
        self.width_plan = width
        self.depth = torch.nn.ParameterDict()
        if sources is not None and len(sources) != old_layers:
            one_hot = torch.nn.functional.one_hot(torch.tensor(sources), old_layers).float()
            for name in layer_names:
                self.depth[_key(name)] = torch.nn.Parameter(one_hot.clone())
        self.width = torch.nn.ParameterDict()
        for name in layer_names + global_names:
            for axis, reads in self._axes(name):
                key = _map_key(axis, reads)
                mapping = width.maps[axis] if axis else None
                if axis is None or key in self.width or len(mapping) == int(mapping.max()) + 1:
                    continue  # the vocabulary, or an axis that does not grow
                e = torch.nn.functional.one_hot(mapping, int(mapping.max()) + 1).float()
                if reads:  # fpi: a weight reading c copies of a unit is divided by c
                    e = e / e.sum(0)[mapping].unsqueeze(1)
                self.width[key] = torch.nn.Parameter(e)

    def _axes(self, name: str) -> list[tuple[str | None, bool]]:
        if self.width_plan is None:
            return []
        return self.width_plan.axes(name, {axis: axis for axis in self.width_plan.maps})  # names, not maps

    def grow(self, name: str, small: torch.Tensor, power: int = 1, layer: int | None = None) -> torch.Tensor:
        """The grown tensor. A layer tensor comes stacked over the small model's layers, [L, ...], and
        grows to [L', ...] (or, given `layer`, that new layer's tensor). power 2: squared map entries."""
        t, offset = small, 0
        if not name.startswith(_GLOBAL_PREFIXES):
            offset = 1
            if _key(name) in self.depth:
                d = self.depth[_key(name)] if layer is None else self.depth[_key(name)][layer:layer + 1]
                t = torch.tensordot(d ** power, t, dims=1)
            elif layer is not None:
                t = t[layer:layer + 1]
        for dim, (axis, reads) in enumerate(self._axes(name)):
            if _map_key(axis, reads) in self.width:  # E applied along that dimension
                e = self.width[_map_key(axis, reads)] ** power
                t = torch.movedim(torch.tensordot(e, t, dims=([1], [dim + offset])), 0, dim + offset)
        return t[0] if layer is not None else t


def _stacked_layers(view: CheckpointView) -> Unit:
    """Every layer's tensors (all states) stacked per name, [L, ...]: any new layer may mix all of them,
    so the small checkpoint is held in memory while growing."""
    layers = [view.read_layer(j) for j in range(view.num_layers)]
    return {state: {name: torch.stack([u[state][name] for u in layers]) for name in tensors}
            for state, tensors in layers[0].items()}


def fit(view: CheckpointView, args, growth: LearnedGrowth, small: dict[str, torch.Tensor], steps: int, lr: float,
        seed: int, data_path: list[str] | None = None, log=None) -> dict:
    """Train the maps for `steps` global batches on the grown model's LM loss (one process, TP=PP=1);
    `small`: the small model's weights (layer tensors stacked). Reads the training samples after those
    the small model consumed; returns the loss per step and that of one fixed held-out global batch
    (the validation split's first) before and after. Progress goes to `log` (default: stderr at the call)."""
    log = log or sys.stderr
    from torch.func import functional_call
    from megagrow.data.loader import build_datasets, microbatches
    from megagrow.data.tokenizer import tokenizer_from_args
    from megagrow.model.gpt import build_gpt_model, transformer_config
    from megagrow.model.layout import fused_name, resize_vocab_rows, split_layer_key
    from megagrow.model.shape import padded_vocab_size
    from megagrow.runtime.distributed import destroy, initialize_distributed, set_seeds

    a = copy.deepcopy(args)
    a.tensor_model_parallel_size = a.pipeline_model_parallel_size = a.data_parallel_size = 1
    a.bf16 = a.fp16 = False  # the maps learn in fp32 whatever the run's precision
    a.transformer_impl = None  # this machine's spec: both map to the same (fused) names below
    if data_path:
        a.data_path = list(data_path)
    started = not torch.distributed.is_initialized()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:  # a free one: a fixed default may be taken by a training run
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    initialize_distributed(1, 1, "gloo")
    try:
        set_seeds(seed)
        try:
            tokenizer = tokenizer_from_args(a)
            train, valid, _ = build_datasets(a, tokenizer)
        except (OSError, ValueError) as e:  # e.g. a checkpoint moved away from its data
            raise GrowthError(f"learn: cannot read the training data: {e} (see --data-path)") from None
        rows = padded_vocab_size(tokenizer.vocab_size, a.make_vocab_size_divisible_by, 1)
        model = build_gpt_model(a, transformer_config(a), tokenizer.vocab_size)
        device = next(model.parameters()).device
        model.requires_grad_(False)
        small = {name: t.float().to(device) for name, t in small.items()}
        growth.to(device)
        where = {}  # model parameter -> (checkpoint name, layer or None)
        for pname, _ in model.named_parameters():
            split = split_layer_key(pname)
            where[pname] = (fused_name(split[1]), split[0]) if split else (pname, None)
            if where[pname][0] not in small:
                raise GrowthError(f"learn: the model's {pname} has no counterpart in the checkpoint")

        def large_params() -> dict[str, torch.Tensor]:
            grown = {name: growth.grow(name, t) for name, t in small.items()}
            return {pname: resize_vocab_rows(grown[name], rows) if name in _VOCAB_ROWS else
                    grown[name][layer] if layer is not None else grown[name] for pname, (name, layer) in where.items()}

        def loss_sum(params, batch) -> tuple[torch.Tensor, torch.Tensor]:
            losses = functional_call(model, params, (batch["tokens"], batch["position_ids"],
                                                     batch.get("attention_mask")), {"labels": batch["labels"]})
            mask = batch["loss_mask"].float()
            return (losses.float() * mask).sum(), mask.sum()

        per_step = a.global_batch_size // a.micro_batch_size
        first = getattr(args, "consumed_train_samples", view.iteration * a.global_batch_size)
        train_iter = microbatches(train, first, a.micro_batch_size, 0, 1, device)
        heldout_iter = microbatches(valid, 0, a.micro_batch_size, 0, 1, device) if valid else train_iter
        heldout = [next(heldout_iter) for _ in range(per_step)]

        @torch.no_grad()
        def heldout_loss() -> float:
            model.eval()
            params = large_params()
            total = torch.stack([torch.stack(loss_sum(params, b)) for b in heldout]).sum(0)
            model.train()
            return (total[0] / total[1]).item()

        record = {"steps": steps, "lr": lr, "learned_entries": sum(p.numel() for p in growth.parameters()),
                  "heldout_loss_before": heldout_loss(), "train_loss": []}
        optimizer = torch.optim.AdamW(growth.parameters(), lr=lr, weight_decay=0.0)  # decay would shrink W'
        print(f"learn: fitting {record['learned_entries']:,} map entries for {steps} steps (lr {lr:g}); "
              f"held-out loss {record['heldout_loss_before']:.4f}", file=log, flush=True)
        for step in range(1, steps + 1):
            batches = [next(train_iter) for _ in range(per_step)]
            tokens = sum(b["loss_mask"].float().sum() for b in batches)
            optimizer.zero_grad()
            params, total = large_params(), 0.0
            for k, batch in enumerate(batches):  # one materialisation per step, its graph kept until the last
                loss = loss_sum(params, batch)[0] / tokens
                loss.backward(retain_graph=k < len(batches) - 1)
                total += loss.item()
            optimizer.step()
            record["train_loss"].append(total)
            if step % max(1, steps // 10) == 0 or step == steps:
                print(f"learn: step {step}/{steps} loss {total:.4f}", file=log, flush=True)
        record["heldout_loss_after"] = heldout_loss()
        print(f"learn: held-out loss {record['heldout_loss_before']:.4f} -> {record['heldout_loss_after']:.4f}",
              file=log, flush=True)
        growth.cpu()
        return record
    finally:
        if started:
            destroy()


class LearnedGrownView(DerivedView):
    """The source view through the fitted maps; `stacked`: the source layers, all states (_stacked_layers)."""

    def __init__(self, inner: CheckpointView, args, growth: LearnedGrowth, record: dict, stacked: Unit):
        super().__init__(inner, args)
        self.growth, self.record, self.stacked = growth.eval().requires_grad_(False), record, stacked

    @torch.no_grad()
    def _grow(self, unit: Unit, layer: int | None = None) -> Unit:
        return {state: {name: self.growth.grow(name, t.float(), 2 if state == "exp_avg_sq" else 1, layer).to(t.dtype)
                        for name, t in tensors.items()} for state, tensors in unit.items()}

    def read_globals(self) -> Unit:
        return self._grow(self.inner.read_globals())

    def read_layer(self, index: int) -> Unit:
        return self._grow(self.stacked, index)

    def save_record(self, root: str) -> None:
        """learned_growth.json (losses) and learned_growth.pt (the maps) beside the grown checkpoint."""
        with open(os.path.join(root, "learned_growth.json"), "w") as f:
            json.dump(self.record, f, indent=1)
        torch.save(self.growth.state_dict(), os.path.join(root, "learned_growth.pt"))


def learned_view(view: CheckpointView, args, steps: int, lr: float, seed: int, save: str, force: bool,
                 sources: list[int] | None = None, width=None, data_path: list[str] | None = None
                 ) -> LearnedGrownView:
    """Fit the maps (depth from `sources`, or width from a WidthPlan) and return the grown view."""
    from megagrow.checkpoint.target import check_target
    # Refuse now what the writer would refuse only after the fit.
    check_target_parallelism(args, args.tensor_model_parallel_size, args.pipeline_model_parallel_size)
    check_target(save, force)
    glob, layer = expected_shapes(args)
    growth = LearnedGrowth(list(layer), list(glob), view.num_layers, sources, width)
    stacked = _stacked_layers(view)
    small = {**view.read_globals()["model"], **stacked["model"]}
    record = fit(view, args, growth, small, steps, lr, seed, data_path)
    return LearnedGrownView(view, args, growth, record, stacked)


@dataclass
class LearnPlan(Plan):
    start: Plan  # where the maps start: stacking's layer plan (depth) or fpi's duplicating maps (width)
    steps: int
    lr: float

    def change(self) -> str:
        return self.start.change()

    def report(self) -> str:
        return self.start.report()


class Learned:
    """G_learn for either kind (mixed into a depth and a width operator, one registry entry): the plan of the
    kind's base operator is where the maps start; the maps are fitted and saved beside the checkpoint."""
    name, preserves_function, reads_data, takes = "learn", False, True, ("steps", "lr")
    params = "steps=INT (fitting steps), lr=FLOAT (default 1e-3)"

    def plan(self, params, old, new) -> LearnPlan:
        steps, lr = learn_params(params)
        start = super().plan(params, old, new)
        return LearnPlan(self, start.old, start.new, start, steps, lr)

    def maps(self, start: Plan) -> dict:
        """learned_view's keywords for where the maps start."""
        raise NotImplementedError

    def view(self, source, plan, args, seed, *, save, force, data_path=None) -> CheckpointView:
        return learned_view(source, args, plan.steps, plan.lr, seed, save, force, data_path=data_path,
                            **self.maps(plan.start))

    def layer_map(self, plan) -> None:
        return None  # a learned layer mixes old ones: never a plain copy

    def written(self, view: LearnedGrownView, save: str) -> None:
        view.save_record(save)


class LearnDepth(Learned, DepthOperator):
    summary = ("G_learn, LiGO: each new layer a learned linear mix of the old ones, from stacking, fitted on the "
               "grown model's LM loss")

    def layers(self, params, old, target):
        if target is None:
            raise GrowthError("learn needs --num-layers (the grown depth) or a new width (--hidden-size ...)")
        return [NewLayer(i % old) for i in range(target)]  # D starts as stacking: 1..L 1..L ..., cut at L'

    def maps(self, start: LayerPlan) -> dict:
        return {"sources": [layer.source for layer in start.layers]}


class LearnWidth(Learned, WidthOperator):
    duplicates = True  # the maps start as fpi's
    summary = "G_learn, LiGO: width maps from fpi's (any sizes), fitted on the grown model's LM loss"

    def maps(self, start: WidthPlan) -> dict:
        return {"width": start}
