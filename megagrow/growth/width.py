"""Width growth on the unsharded view: hidden size, FFN size and attention heads (whole query groups).

Every grown tensor is described by its axes: the hidden axis (residual stream), FFN units, query
groups (qkv rows: per group its q heads, k, v) and attention heads (linear_proj columns). A map per
axis sends each new index to the old index it copies, or -1 for a new one; the head size stays, and with it
the q/k norms (--qk-layernorm). QKV biases follow the QKV rows (per query group). With --apply-layernorm-1p
the maps act on a norm's scale, 1 + weight.
- `direct`: old entries copied, new entries initialised as the trainer would.
- `zero`: as direct, but whatever new would write into old outputs is zero (new embedding columns,
  output-projection rows of new hidden dims and columns of new heads/units) and RMSNorm weights are
  scaled by sqrt(h/H) for the longer mean: the same function for RMSNorm models (a hidden growth is refused
  with --qk-layernorm, whose head-size norms share the epsilon it scales).
- `random` (G_random): as direct, but new matrix entries drawn at the trained tensor's own scale
  (std of its old entries) rather than the trainer's initial one.
- `fpi` (Net2Net): new units duplicate old ones (i -> i mod old), weights reading a duplicated axis are
  divided by its number of copies: the same function for whole multiples of every size (uniform
  duplication keeps RMS, LayerNorm mean and variance); tied embeddings cannot be both copied and divided.
- `aki` (bert2BERT): as fpi (any sizes), but in each layer the entries of new units come from the
  layer above (the last layer uses itself).
- `msg`, `pdg`: as direct, with the new indices behind growth masks (model.growth_masks) that open
  over `steps` iterations during training: the same function at growth time.
Each is a `WidthOperator` (its hooks fill the new entries), registered in growth.registry; its
`WidthPlan` holds the maps. Adam moments follow the weights (copied, scaled by c and c^2 where the
weight is, zero when new or zeroed); fp32 main copies equal the new weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megagrow.checkpoint.view import CheckpointView, DerivedView, Unit
from megagrow.growth.operators import GrowthError, Operator, Plan
from megagrow.model.layout import is_norm_weight
from megagrow.model.shape import (WIDTH_FIELDS, ModelShape, expected_shapes, kv_channels, query_groups, tied,
                                  zero_centered_gamma)

_MAIN_COPIES = ("param", "fp32_param")


def _axis_map(old: int, new: int, duplicate: bool) -> torch.Tensor:
    idx = torch.arange(new)
    return idx % old if duplicate else torch.where(idx < old, idx, torch.full_like(idx, -1))


def _blocks(groups: torch.Tensor, block: int) -> torch.Tensor:
    """Expand a map over blocks (groups, heads) to a map over their rows."""
    rows = groups.repeat_interleave(block) * block + torch.arange(block).repeat(len(groups))
    return torch.where(groups.repeat_interleave(block) >= 0, rows, torch.full_like(rows, -1))


@dataclass
class WidthPlan(Plan):
    """Per axis a map new index -> old index it copies (-1: new); `op` (a WidthOperator) says how entries fill."""
    steps: int | None = None  # msg/pdg: iterations over which the growth masks open

    def __post_init__(self):
        self.gated = self.old.swiglu
        self.maps = self._maps(self.op.duplicates)
        self.new_positions = self._maps(False)  # -1 wherever an index is new, whatever fills it

    def change(self) -> str:
        o, n = self.old, self.new
        return f"width h {o.hidden_size} -> {n.hidden_size}, ffn {o.ffn_hidden_size} -> {n.ffn_hidden_size}, " \
               f"heads {o.num_attention_heads} -> {n.num_attention_heads}"

    def report(self) -> str:
        o, n = self.old, self.new
        return f"{self.change()}, query groups {o.num_query_groups} -> {n.num_query_groups}"

    def _maps(self, duplicate: bool) -> dict[str, torch.Tensor]:
        o, n = self.old, self.new
        q, a, d = query_groups(o), o.num_attention_heads, kv_channels(o)
        groups = _axis_map(q, query_groups(n), duplicate)
        units = _axis_map(o.ffn_hidden_size, n.ffn_hidden_size, duplicate)
        fc1 = torch.cat([units, torch.where(units >= 0, units + o.ffn_hidden_size, units)]) if self.gated else units
        return {"hidden": _axis_map(o.hidden_size, n.hidden_size, duplicate), "units": units, "fc1_rows": fc1,
                "qkv_rows": _blocks(groups, (a // q + 2) * d), "heads": _blocks(_blocks(groups, a // q), d)}

    def axes(self, name: str, maps: dict | None = None) -> list[tuple[torch.Tensor, bool]]:
        """Per dimension: (map new -> old index, whether the weight reads that axis: divided by copies)."""
        m = maps or self.maps
        h = (m["hidden"], False)
        if name.endswith(("word_embeddings.weight", "position_embeddings.weight")):
            return [(None, False), h]
        if name == "output_layer.weight":
            return [(None, False), (m["hidden"], True)]
        if name.endswith(("q_layernorm.weight", "q_layernorm.bias", "k_layernorm.weight", "k_layernorm.bias")):
            return [(None, False)]  # over the head dim, which width growth keeps (heads grow in number)
        if "layer_norm" in name or "final_layernorm" in name:
            return [h]
        if name.endswith("linear_qkv.weight"):
            return [(m["qkv_rows"], False), (m["hidden"], True)]
        if name.endswith("linear_qkv.bias"):
            return [(m["qkv_rows"], False)]
        if name.endswith("linear_proj.weight"):
            return [h, (m["heads"], True)]
        if name.endswith("linear_fc1.weight"):
            return [(m["fc1_rows"], False), (m["hidden"], True)]
        if name.endswith("linear_fc1.bias"):
            return [(m["fc1_rows"], False)]
        if name.endswith("linear_fc2.weight"):
            return [h, (m["units"], True)]
        if name.endswith(("linear_proj.bias", "linear_fc2.bias")):
            return [h]
        raise GrowthError(f"width growth does not know how to grow {name}")

    def grow(self, name: str, old: torch.Tensor, fresh: torch.Tensor, power: int,
             upper: torch.Tensor | None = None) -> torch.Tensor:
        """The grown tensor: `fresh` (the new shape's initial value) with old entries copied in.

        power 1 for weights and first moments, 2 for second moments (scaled by the square);
        `upper`: the same tensor of the layer above, which aki's new entries come from."""
        axes = self.axes(name)
        index, scale = [], torch.ones(())
        for dim, (mapping, reads) in enumerate(axes):
            if mapping is None:
                mapping = torch.arange(old.shape[dim])
            index.append(mapping)
            if reads and self.op.divides:
                counts = torch.bincount(mapping[mapping >= 0], minlength=old.shape[dim]).to(old.dtype)
                factor = (1.0 / counts[mapping.clamp(min=0)]) ** power
                shape = [1] * old.dim()
                shape[dim] = -1
                scale = scale * factor.reshape(shape)
        copied, keep = old, torch.ones((), dtype=torch.bool)
        for dim, mapping in enumerate(index):
            copied = copied.index_select(dim, mapping.clamp(min=0))
            shape = [1] * old.dim()
            shape[dim] = -1
            keep = keep & (mapping >= 0).reshape(shape)
        if upper is not None:
            from_upper = upper
            for dim, mapping in enumerate(index):
                from_upper = from_upper.index_select(dim, mapping.clamp(min=0))
            copied = torch.where(self._is_new(name, old.dim()), from_upper, copied)
        out = torch.where(keep, (copied * scale).to(fresh.dtype), fresh)
        return self.op.adjust(self, name, out, index, power)

    def _is_new(self, name: str, ndim: int) -> torch.Tensor:
        new = torch.zeros((), dtype=torch.bool)
        for dim, (mapping, _) in enumerate(self.axes(name, self.new_positions)):
            if mapping is not None:
                shape = [1] * ndim
                shape[dim] = -1
                new = new | (mapping < 0).reshape(shape)
        return new


class WidthGrownView(DerivedView):
    def __init__(self, inner: CheckpointView, plan: WidthPlan, args, seed: int):
        super().__init__(inner, args)
        self.plan, self.seed = plan, seed
        self.zero_centered = zero_centered_gamma(args)

    def _unit(self, unit: Unit, shapes: dict, prefix: str, upper: Unit | None = None) -> Unit:
        from megagrow.model.init import init_global_tensor  # imports megatron-core: not needed for planning
        a = self.args
        out: Unit = {}
        for name, old in unit["model"].items():
            shape = shapes[name] if name in shapes else (old.shape[0],) + tuple(shapes[
                "embedding.word_embeddings.weight"][1:])
            fresh = init_global_tensor(prefix + name, shape, self.seed, getattr(a, "init_method_std", 0.02),
                                       a.num_layers, getattr(a, "tokenizer_vocab_size", a.padded_vocab_size),
                                       self.zero_centered)
            fresh = self.plan.op.fresh(old, fresh)
            # --apply-layernorm-1p stores a norm's scale minus 1: the maps act on the scale (moments are the same)
            shift = 1.0 if self.zero_centered and is_norm_weight(name) else 0.0
            work = torch.float32 if shift else old.dtype  # 1 + w in bf16 would round w away

            def above(state: str) -> torch.Tensor | None:
                return None if upper is None else upper[state][name]
            up = above("model")
            weight = (self.plan.grow(name, old.to(work) + shift, fresh.to(work) + shift, 1,
                                     None if up is None else up.to(work) + shift) - shift).to(old.dtype)
            out.setdefault("model", {})[name] = weight
            for state in self.optimizer_states:
                if name not in unit.get(state, {}):
                    continue
                src = unit[state][name]
                if state in _MAIN_COPIES:
                    out.setdefault(state, {})[name] = weight.to(src.dtype)
                else:
                    power = 2 if state == "exp_avg_sq" else 1
                    out.setdefault(state, {})[name] = self.plan.grow(name, src, torch.zeros(shape, dtype=src.dtype),
                                                                     power, above(state))
        return out

    def read_globals(self) -> Unit:
        shapes = dict(expected_shapes(self.args)[0])
        unit = self.inner.read_globals()
        for name, t in unit["model"].items():  # keep the source's (padded) vocabulary rows
            if name in shapes:
                shapes[name] = (t.shape[0],) + tuple(shapes[name][1:]) if t.dim() == 2 else shapes[name]
        return self._unit(unit, shapes, "")

    def read_layer(self, index: int) -> Unit:
        upper = self.plan.op.upper_layer(index, self.inner.num_layers)
        if upper is not None:
            upper = self.inner.read_layer(upper)
        return self._unit(self.inner.read_layer(index), expected_shapes(self.args)[1], f"decoder.layers.{index}.",
                          upper)


class WidthOperator(Operator):
    """A width operator: how the new entries of the maps' new indices are filled (hooks called per tensor)."""
    kind, preserves_function = "width", False
    duplicates = False  # new indices copy old ones (i -> i mod old) rather than start new
    divides = False  # weights reading a duplicated axis are divided by its number of copies

    def plan(self, params: dict[str, str], old: ModelShape, new: ModelShape) -> WidthPlan:
        h, f, a, q = old.hidden_size, old.ffn_hidden_size, old.num_attention_heads, query_groups(old)
        H, F, A, Q = new.hidden_size, new.ffn_hidden_size, new.num_attention_heads, query_groups(new)
        for name, o, n in (("--hidden-size", h, H), ("--ffn-hidden-size", f, F), ("--num-attention-heads", a, A),
                           ("--num-query-groups", q, Q)):
            if n < o:
                raise GrowthError(f"{name} {n} is smaller than the model's {o}: growth cannot shrink")
        if A % Q or A // Q != a // q:
            raise GrowthError(f"--num-attention-heads {A} / --num-query-groups {Q} must keep {a // q} heads per "
                              "query group (width growth adds whole query groups)")
        if H % A:  # what the trainer (and Megatron-LM without --kv-channels) requires of every model
            raise GrowthError(f"--hidden-size {H} is not divisible by --num-attention-heads {A}")
        if (H, F, A) == (h, f, a):
            raise GrowthError("width growth: no size grows (give a larger --hidden-size, --ffn-hidden-size or heads)")
        self.check(old, new)
        return WidthPlan(self, old, new)

    def check(self, old: ModelShape, new: ModelShape) -> None:
        """What this operator refuses beyond the sizes every width growth needs."""

    def configure(self, plan: Plan, args, source: CheckpointView) -> list[str]:
        for key in WIDTH_FIELDS + ("group_query_attention", "kv_channels"):  # heads grow in number, not in size
            setattr(args, key, getattr(plan.new, key))
        return []

    def view(self, source, plan, args, seed, *, save, force, data_path=None) -> CheckpointView:
        return WidthGrownView(source, plan, args, seed)

    def fresh(self, old: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        """The values new entries start from, given the trainer's initial ones."""
        return fresh

    def adjust(self, plan: WidthPlan, name: str, out: torch.Tensor, index: list[torch.Tensor],
               power: int) -> torch.Tensor:
        """The grown tensor after copying (index: per dimension the map, -1 where new)."""
        return out

    def upper_layer(self, index: int, num_layers: int) -> int | None:
        """The source layer whose entries fill layer `index`'s new ones, if any."""
        return None


class Direct(WidthOperator):
    name, summary = "direct", "old weights copied, new rows/columns initialised as the trainer would"


class Zero(WidthOperator):
    name, preserves_function = "zero", True
    summary = "as direct, with every new path into old outputs zero; function-preserving for RMSNorm models"

    def check(self, old, new):
        if old.normalization != "RMSNorm" and new.hidden_size != old.hidden_size:
            raise GrowthError("zero: keeping the function while the hidden size grows needs RMSNorm (LayerNorm's "
                              "mean would change); use --op fpi or direct")
        if old.qk_layernorm and new.hidden_size != old.hidden_size:
            raise GrowthError("zero: keeping the function while the hidden size grows scales --norm-epsilon by h/H, "
                              "which would change the --qk-layernorm norms (over the head size, which stays); use "
                              "--op fpi, or grow only --ffn-hidden-size and the heads")

    def configure(self, plan, args, source):
        notes = super().configure(plan, args, source)
        if plan.new.hidden_size != plan.old.hidden_size:
            # RMSNorm over H dims of which h are non-zero: mean(x^2) shrinks by h/H, and so must epsilon.
            args.layernorm_epsilon = getattr(source.args, "layernorm_epsilon", 1e-5) * plan.old.hidden_size / \
                plan.new.hidden_size
            notes.append(f"note: --norm-epsilon scaled to {args.layernorm_epsilon:.6g} (recorded in the checkpoint's "
                         "args) so that the grown model computes the same function; pass it when training the grown "
                         "model")
        return notes

    def adjust(self, plan, name, out, index, power):
        new = [m < 0 for m in index]
        if name.endswith(("word_embeddings.weight", "position_embeddings.weight")):
            out[:, new[1]] = 0
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            out[new[0], :] = 0
            out[:, new[1]] = 0
        elif name.endswith(("linear_proj.bias", "linear_fc2.bias")):
            out[new[0]] = 0
        if "layer_norm_weight" in name or name == "decoder.final_layernorm.weight":
            scale = math.sqrt(plan.old.hidden_size / plan.new.hidden_size)  # the longer mean of RMSNorm
            out = torch.where(index[0] >= 0, out * scale ** power, out)
        return out


class Random(WidthOperator):
    name, summary = "random", "G_random: as direct, new entries drawn at the scale of the trained weights"

    def fresh(self, old, fresh):
        if old.dim() >= 2 and fresh.std() > 0:
            return fresh * (old.float().std() / fresh.std())  # at the trained weights' scale
        return fresh


class Fpi(WidthOperator):
    name, preserves_function, duplicates, divides = "fpi", True, True, True
    summary = "Net2Net: new units duplicate old ones, weights reading them divided (whole multiples of each size)"

    def check(self, old, new):
        for flag, key in (("--hidden-size", "hidden_size"), ("--ffn-hidden-size", "ffn_hidden_size"),
                          ("--num-query-groups", "num_query_groups")):
            if getattr(new, key) % getattr(old, key):
                raise GrowthError(f"fpi: {flag} {getattr(new, key)} is not a whole multiple of {getattr(old, key)}")
        if new.hidden_size != old.hidden_size and tied(old):
            raise GrowthError("fpi: tied embeddings cannot grow the hidden size (the embedding is copied, the "
                              "output layer divided); untie them or use --op zero")


class Aki(WidthOperator):
    name, duplicates, divides = "aki", True, True
    summary = "bert2BERT AKI: as fpi (any sizes), new units taken from the layer above"

    def upper_layer(self, index, num_layers):
        return min(index + 1, num_layers - 1)  # the top layer uses itself


class Masked(WidthOperator):
    """msg, pdg: as direct, the new indices behind growth masks the trainer opens over `steps` iterations."""
    preserves_function, params, takes = True, "steps=INT (iterations over which the masks open)", ("steps",)

    def plan(self, params, old, new):
        try:
            steps = int(params.get("steps", ""))
        except ValueError:
            raise GrowthError(f"--op {self.name}: give the iterations over which the masks open, e.g. "
                              f"{self.name}:steps=100") from None
        if steps < 1:
            raise GrowthError(f"--op {self.name}:steps={steps}: steps must be at least 1")
        plan = super().plan(params, old, new)
        plan.steps = steps
        return plan

    def configure(self, plan, args, source):
        notes = super().configure(plan, args, source)
        # Written with the grown checkpoint: views derived from `source` share its run state.
        source.run_state["growth_masks"] = {
            "kind": self.name, "begin": source.iteration, "end": source.iteration + plan.steps,
            "hidden_size": plan.old.hidden_size, "ffn_hidden_size": plan.old.ffn_hidden_size,
            "num_attention_heads": plan.old.num_attention_heads}
        return notes


class Msg(Masked):
    name, summary = "msg", "masked structural growth: as direct, new width behind masks ramped 0 -> 1 in N steps"


class Pdg(Masked):
    name, summary = "pdg", "paper 002 progressive dimensionality growth: new dims opened r per step over N steps"
