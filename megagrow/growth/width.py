"""Width growth on the unsharded view: hidden size, FFN size and attention heads (whole query groups).

Every grown tensor is described by its axes: the hidden axis (residual stream), FFN units, query
groups (qkv rows: per group its q heads, k, v) and attention heads (linear_proj columns). A map per
axis sends each new index to the old index it copies, or -1 for a new one; the head size stays.
- `direct`: old entries copied, new entries initialised as the trainer would.
- `zero`: as direct, but whatever new would write into old outputs is zero (new embedding columns,
  output-projection rows of new hidden dims and columns of new heads/units) and RMSNorm weights are
  scaled by sqrt(h/H) for the longer mean: the same function for RMSNorm models.
- `fpi` (Net2Net): new units duplicate old ones (i -> i mod old), weights reading a duplicated axis are
  divided by its number of copies: the same function for whole multiples of every size (uniform
  duplication keeps RMS, LayerNorm mean and variance); tied embeddings cannot be both copied and divided.
Adam moments follow the weights (copied, scaled by c and c^2 where the weight is, zero when new or
zeroed); fp32 main copies equal the new weights.
"""

from __future__ import annotations

import math

import torch

from megagrow.checkpoint.view import CheckpointView, DerivedView, Unit, expected_shapes, kv_channels, query_groups, tied
from megagrow.growth.depth import GrowthError
from megagrow.model.init import init_global_tensor

WIDTH_OPERATORS = {
    "direct": (False, "old weights copied, new rows/columns initialised as the trainer would"),
    "zero": (True, "as direct, with every new path into old outputs zero; function-preserving for RMSNorm models"),
    "fpi": (True, "Net2Net: new units duplicate old ones, weights reading them divided (whole multiples of each size)"),
}
_MAIN_COPIES = ("param", "fp32_param")


def _axis_map(old: int, new: int, duplicate: bool) -> torch.Tensor:
    idx = torch.arange(new)
    return idx % old if duplicate else torch.where(idx < old, idx, torch.full_like(idx, -1))


def _blocks(groups: torch.Tensor, block: int) -> torch.Tensor:
    """Expand a map over blocks (groups, heads) to a map over their rows."""
    rows = groups.repeat_interleave(block) * block + torch.arange(block).repeat(len(groups))
    return torch.where(groups.repeat_interleave(block) >= 0, rows, torch.full_like(rows, -1))


class WidthPlan:
    def __init__(self, old_args, new_args, op: str):
        if op not in WIDTH_OPERATORS:
            raise GrowthError(f"--op {op}: unknown width operator (width: {', '.join(WIDTH_OPERATORS)})")
        self.op, self.old, self.new = op, old_args, new_args
        h, f, a, q, d = (old_args.hidden_size, old_args.ffn_hidden_size, old_args.num_attention_heads,
                         query_groups(old_args), kv_channels(old_args))
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
        dup = op == "fpi"
        if dup:
            for name, o, n in (("--hidden-size", h, H), ("--ffn-hidden-size", f, F), ("--num-query-groups", q, Q)):
                if n % o:
                    raise GrowthError(f"fpi: {name} {n} is not a whole multiple of {o}")
            if H != h and tied(old_args):
                raise GrowthError("fpi: tied embeddings cannot grow the hidden size (the embedding is copied, the "
                                  "output layer divided); untie them or use --op zero")
        if op == "zero" and getattr(old_args, "normalization", "LayerNorm") != "RMSNorm" and H != h:
            raise GrowthError("zero: keeping the function while the hidden size grows needs RMSNorm (LayerNorm's "
                              "mean would change); use --op fpi or direct")
        self.hidden = _axis_map(h, H, dup)
        self.units = _axis_map(f, F, dup)
        groups = _axis_map(q, Q, dup)
        self.qkv_rows = _blocks(groups, (a // q + 2) * d)
        self.heads = _blocks(_blocks(groups, a // q), d)
        self.gated = bool(getattr(old_args, "swiglu", False))
        self.norm_scale = math.sqrt(h / H) if op == "zero" else 1.0

    def _fc1_rows(self) -> torch.Tensor:
        if not self.gated:
            return self.units
        f = self.old.ffn_hidden_size
        up = torch.where(self.units >= 0, self.units + f, self.units)
        return torch.cat([self.units, up])

    def axes(self, name: str) -> list[tuple[torch.Tensor, bool]]:
        """Per dimension: (map new -> old index, whether the weight reads that axis: divided by copies)."""
        h = (self.hidden, False)
        if name.endswith(("word_embeddings.weight", "position_embeddings.weight")):
            return [(None, False), h]
        if name == "output_layer.weight":
            return [(None, False), (self.hidden, True)]
        if "layer_norm" in name or "final_layernorm" in name:
            return [h]
        if name.endswith("linear_qkv.weight"):
            return [(self.qkv_rows, False), (self.hidden, True)]
        if name.endswith("linear_qkv.bias"):
            return [(self.qkv_rows, False)]
        if name.endswith("linear_proj.weight"):
            return [h, (self.heads, True)]
        if name.endswith("linear_fc1.weight"):
            return [(self._fc1_rows(), False), (self.hidden, True)]
        if name.endswith("linear_fc1.bias"):
            return [(self._fc1_rows(), False)]
        if name.endswith("linear_fc2.weight"):
            return [h, (self.units, True)]
        if name.endswith(("linear_proj.bias", "linear_fc2.bias")):
            return [h]
        raise GrowthError(f"width growth does not know how to grow {name}")

    def grow(self, name: str, old: torch.Tensor, fresh: torch.Tensor, power: int) -> torch.Tensor:
        """The grown tensor: `fresh` (the new shape's initial value) with old entries copied in.

        power 1 for weights and first moments, 2 for second moments (scaled by the square)."""
        axes = self.axes(name)
        index, scale = [], torch.ones(())
        for dim, (mapping, reads) in enumerate(axes):
            if mapping is None:
                mapping = torch.arange(old.shape[dim])
            index.append(mapping)
            if reads and self.op == "fpi":
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
        out = torch.where(keep, (copied * scale).to(fresh.dtype), fresh)
        if self.op == "zero":
            out = self._zero_new_paths(name, out, index)
            if "layer_norm_weight" in name or name == "decoder.final_layernorm.weight":
                out = torch.where(index[0] >= 0, out * self.norm_scale ** power, out)
        return out

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

    def _unit(self, unit: Unit, shapes: dict, prefix: str) -> Unit:
        a = self.args
        out: Unit = {}
        for name, old in unit["model"].items():
            shape = shapes[name] if name in shapes else (old.shape[0],) + tuple(shapes[
                "embedding.word_embeddings.weight"][1:])
            fresh = init_global_tensor(prefix + name, shape, self.seed, getattr(a, "init_method_std", 0.02),
                                       a.num_layers, getattr(a, "tokenizer_vocab_size", a.padded_vocab_size))
            weight = self.plan.grow(name, old, fresh.to(old.dtype), 1)
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
                                                                     power)
        return out

    def read_globals(self) -> Unit:
        shapes = dict(expected_shapes(self.args)[0])
        unit = self.inner.read_globals()
        for name, t in unit["model"].items():  # keep the source's (padded) vocabulary rows
            if name in shapes:
                shapes[name] = (t.shape[0],) + tuple(shapes[name][1:]) if t.dim() == 2 else shapes[name]
        return self._unit(unit, shapes, "")

    def read_layer(self, index: int) -> Unit:
        return self._unit(self.inner.read_layer(index), expected_shapes(self.args)[1], f"decoder.layers.{index}.")
