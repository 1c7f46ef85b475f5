"""Width growth on the unsharded view: hidden size, FFN size and attention heads (whole query groups).

Every grown tensor is described by its axes: the hidden axis (residual stream), FFN units, query
groups (qkv rows: per group its q heads, k, v) and attention heads (linear_proj columns). A map per
axis sends each new index to the old index it copies, or -1 for a new one; the head size stays.
- `direct`: old entries copied, new entries initialised as the trainer would.
- `zero`: as direct, but whatever new would write into old outputs is zero (new embedding columns,
  output-projection rows of new hidden dims and columns of new heads/units) and RMSNorm weights are
  scaled by sqrt(h/H) for the longer mean: the same function for RMSNorm models.
- `random` (G_random): as direct, but new matrix entries drawn at the trained tensor's own scale
  (std of its old entries) rather than the trainer's initial one.
- `fpi` (Net2Net): new units duplicate old ones (i -> i mod old), weights reading a duplicated axis are
  divided by its number of copies: the same function for whole multiples of every size (uniform
  duplication keeps RMS, LayerNorm mean and variance); tied embeddings cannot be both copied and divided.
- `aki` (bert2BERT): as fpi (any sizes), but in each layer the entries of new units come from the
  layer above (the last layer uses itself).
- `msg`, `pdg`: as direct, with the new indices behind growth masks (model.growth_masks) that open
  over `steps` iterations during training: the same function at growth time.
Adam moments follow the weights (copied, scaled by c and c^2 where the weight is, zero when new or
zeroed); fp32 main copies equal the new weights.
"""

from __future__ import annotations

import math

import torch

from megagrow.checkpoint.view import CheckpointView, DerivedView, Unit
from megagrow.model.shape import expected_shapes, kv_channels, query_groups, tied
from megagrow.growth.depth import GrowthError
from megagrow.growth.learn import learn_params
from megagrow.model.init import init_global_tensor

WIDTH_OPERATORS = {
    "direct": (False, "old weights copied, new rows/columns initialised as the trainer would"),
    "zero": (True, "as direct, with every new path into old outputs zero; function-preserving for RMSNorm models"),
    "random": (False, "G_random: as direct, new entries drawn at the scale of the trained weights"),
    "fpi": (True, "Net2Net: new units duplicate old ones, weights reading them divided (whole multiples of each size)"),
    "aki": (False, "bert2BERT AKI: as fpi, new units taken from the layer above"),
    "msg": (True, "masked structural growth (msg:steps=N): as direct, new width behind masks ramped 0 -> 1 in N steps"),
    "pdg": (True, "paper 002 progressive dimensionality growth (pdg:steps=N): new dims opened r per step over N steps"),
    "learn": (False, "G_learn, LiGO (learn:steps=N[,lr=X]): width maps from fpi's (any sizes), fitted N steps on the "
                     "grown model's LM loss (growth.learn)"),
}
MASKED = ("msg", "pdg")
_MAIN_COPIES = ("param", "fp32_param")


def _axis_map(old: int, new: int, duplicate: bool) -> torch.Tensor:
    idx = torch.arange(new)
    return idx % old if duplicate else torch.where(idx < old, idx, torch.full_like(idx, -1))


def _blocks(groups: torch.Tensor, block: int) -> torch.Tensor:
    """Expand a map over blocks (groups, heads) to a map over their rows."""
    rows = groups.repeat_interleave(block) * block + torch.arange(block).repeat(len(groups))
    return torch.where(groups.repeat_interleave(block) >= 0, rows, torch.full_like(rows, -1))


class WidthPlan:
    def __init__(self, old_args, new_args, spec: str):
        from megagrow.growth.operators import parse_spec
        op, params = parse_spec(spec)
        if op not in WIDTH_OPERATORS:
            raise GrowthError(f"--op {op}: unknown width operator (width: {', '.join(WIDTH_OPERATORS)})")
        unknown = set(params) - ({"steps"} if op in MASKED else set())
        if op == "learn":
            self.learn = learn_params(params)  # (steps, lr); refuses unknown parameters itself
        elif unknown:
            raise GrowthError(f"--op {spec}: unknown parameter {sorted(unknown)[0]}")
        self.op, self.old, self.new = op, old_args, new_args
        self.steps = None
        if op in MASKED:
            try:
                self.steps = int(params.get("steps", ""))
            except ValueError:
                raise GrowthError(f"--op {spec}: give the iterations over which the masks open, e.g. {op}:steps=100") \
                    from None
            if self.steps < 1:
                raise GrowthError(f"--op {spec}: steps must be at least 1")
        h, f, a, q = old_args.hidden_size, old_args.ffn_hidden_size, old_args.num_attention_heads, query_groups(old_args)
        H, F, A, Q = new_args.hidden_size, new_args.ffn_hidden_size, new_args.num_attention_heads, query_groups(new_args)
        for name, o, n in (("--hidden-size", h, H), ("--ffn-hidden-size", f, F), ("--num-attention-heads", a, A),
                           ("--num-query-groups", q, Q)):
            if n < o:
                raise GrowthError(f"{name} {n} is smaller than the model's {o}: growth cannot shrink")
        if A % Q or A // Q != a // q:
            raise GrowthError(f"--num-attention-heads {A} / --num-query-groups {Q} must keep {a // q} heads per "
                              "query group (width growth adds whole query groups)")
        if (H, F, A) == (h, f, a):
            raise GrowthError("width growth: no size grows (give a larger --hidden-size, --ffn-hidden-size or heads)")
        dup = op in ("fpi", "aki", "learn")  # learn starts from fpi's duplication
        if op == "fpi":
            for name, o, n in (("--hidden-size", h, H), ("--ffn-hidden-size", f, F), ("--num-query-groups", q, Q)):
                if n % o:
                    raise GrowthError(f"fpi: {name} {n} is not a whole multiple of {o}")
            if H != h and tied(old_args):
                raise GrowthError("fpi: tied embeddings cannot grow the hidden size (the embedding is copied, the "
                                  "output layer divided); untie them or use --op zero")
        if op == "zero" and getattr(old_args, "normalization", "LayerNorm") != "RMSNorm" and H != h:
            raise GrowthError("zero: keeping the function while the hidden size grows needs RMSNorm (LayerNorm's "
                              "mean would change); use --op fpi or direct")
        self.gated = bool(getattr(old_args, "swiglu", False))
        self.maps = self._maps(dup)
        self.new_positions = self._maps(False)  # -1 wherever an index is new, whatever fills it
        self.norm_scale = math.sqrt(h / H) if op == "zero" else 1.0

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
            if reads and self.op in ("fpi", "aki"):
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
        if self.op == "zero":
            out = self._zero_new_paths(name, out, index)
            if "layer_norm_weight" in name or name == "decoder.final_layernorm.weight":
                out = torch.where(index[0] >= 0, out * self.norm_scale ** power, out)
        return out

    def _is_new(self, name: str, ndim: int) -> torch.Tensor:
        new = torch.zeros((), dtype=torch.bool)
        for dim, (mapping, _) in enumerate(self.axes(name, self.new_positions)):
            if mapping is not None:
                shape = [1] * ndim
                shape[dim] = -1
                new = new | (mapping < 0).reshape(shape)
        return new

    def _zero_new_paths(self, name: str, t: torch.Tensor, index: list[torch.Tensor]) -> torch.Tensor:
        new = [m < 0 for m in index]
        if name.endswith(("word_embeddings.weight", "position_embeddings.weight")):
            t[:, new[1]] = 0
        elif name.endswith(("linear_proj.weight", "linear_fc2.weight")):
            t[new[0], :] = 0
            t[:, new[1]] = 0
        elif name.endswith(("linear_proj.bias", "linear_fc2.bias")):
            t[new[0]] = 0
        return t


class WidthGrownView(DerivedView):
    def __init__(self, inner: CheckpointView, plan: WidthPlan, args, seed: int):
        super().__init__(inner, args)
        self.plan, self.seed = plan, seed

    def _unit(self, unit: Unit, shapes: dict, prefix: str, upper: Unit | None = None) -> Unit:
        a = self.args
        out: Unit = {}
        for name, old in unit["model"].items():
            shape = shapes[name] if name in shapes else (old.shape[0],) + tuple(shapes[
                "embedding.word_embeddings.weight"][1:])
            fresh = init_global_tensor(prefix + name, shape, self.seed, getattr(a, "init_method_std", 0.02),
                                       a.num_layers, getattr(a, "tokenizer_vocab_size", a.padded_vocab_size))
            if self.plan.op == "random" and old.dim() >= 2 and fresh.std() > 0:
                fresh = fresh * (old.float().std() / fresh.std())  # at the trained weights' scale

            def above(state: str) -> torch.Tensor | None:
                return None if upper is None else upper[state][name]
            weight = self.plan.grow(name, old, fresh.to(old.dtype), 1, above("model"))
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
        upper = None
        if self.plan.op == "aki":  # bert2BERT: new units from the layer above; the top layer uses itself
            upper = self.inner.read_layer(min(index + 1, self.inner.num_layers - 1))
        return self._unit(self.inner.read_layer(index), expected_shapes(self.args)[1], f"decoder.layers.{index}.",
                          upper)
