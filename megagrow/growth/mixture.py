"""MixtureGrowth (Pham et al., WACV 2024): twice the width from two trained models of the same shape.

The two small models are the templates. Every linear weight of the grown model holds them on its diagonal
blocks and, off it, new linear combinations of the same two templates:
    W = [[W_A, a W_A + b W_B], [c W_A + d W_B, W_B]]
so that rows and columns are A's then B's along every axis, in the unsharded view's layout (model.layout):
the hidden axis, FFN units, query groups (QKV rows: A's g groups whole, then B's) and attention heads
(linear_proj columns). SwiGLU's fc1 is [gate; up]: each half is blocked on its own. Biases, norms and the
embeddings are A's and B's side by side; the output layer holds each model's half times 1/2, so the logits
are the mean of the two models' logits (logits rather than probabilities: no output layer computes a mean of
probabilities). That holds exactly when the mixed blocks are zero and the two halves of the
residual stream have the same norm statistics (a norm is taken over the whole 2h), approximately otherwise.
Tied embeddings cannot be both joined and halved, and the --qk-layernorm norms (over the head size, shared
by every head) cannot hold two models: both are refused.

Coefficients as the paper's code initialises its members' coefficient vectors (nn.init.orthogonal_, unit
norm, `coefs_noise_growing` = 1 as the scale): (a, b) and (c, d) are the rows of a random orthogonal 2x2
matrix, times `scale`. (Its growth-time rule, a vector orthogonal to the existing members', has no room here:
A's (1, 0) and B's (0, 1) span both templates.) `init=random` draws them uniform in [0, scale) (its
`coefs_growing=random`), `init=zero` leaves the mixed blocks zero (the two models side by side). One draw per weight tensor, from
the seed and the tensor's name only (`coefficients`), so any layout and format give the same model.
Adam moments: the diagonal blocks keep their model's, the mixed blocks start at zero like every other width
operator's new entries (they are new parameters with no gradient history of their own; A's and B's
moments combined would steer their first steps along the templates' old gradients). The output layer's
halved weights carry m/2 and v/4; fp32 main copies follow the weights' formula, from each model's own.
Iteration, optimizer step and scheduler are the first model's; the FLOPs so far both models' together (what
the grown model cost).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, fields

import torch

from megagrow.checkpoint.view import CheckpointView, DerivedView, Unit
from megagrow.growth.operators import GrowthError, Operator, Plan
from megagrow.model.layout import resize_vocab_rows
from megagrow.model.shape import WIDTH_FIELDS, ModelShape, query_groups, tied

INITS = ("orthogonal", "random", "zero")
_MAIN_COPIES = ("param", "fp32_param")
_JOINED_ROWS = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight", "output_layer.weight")


def coefficients(seed: int, name: str, init: str = "orthogonal", scale: float = 1.0) -> torch.Tensor:
    """[[a, b], [c, d]] of the tensor `name` (global name: `decoder.layers.3.mlp.linear_fc1.weight`)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    if init == "zero":
        return torch.zeros(2, 2)
    if init == "random":
        return torch.rand(2, 2, generator=g) * scale
    return torch.nn.init.orthogonal_(torch.empty(2, 2), generator=g) * scale


def _mixed(a: torch.Tensor, b: torch.Tensor, coef: torch.Tensor, parts: int) -> torch.Tensor:
    """[[A, aA + bB], [cA + dB, B]] per row part (SwiGLU fc1: gate, then up)."""
    (ca, cb), (cc, cd) = coef.tolist()
    out = []
    for x, y in zip(a.chunk(parts), b.chunk(parts)):
        out += [torch.cat([x, ca * x + cb * y], 1), torch.cat([cc * x + cd * y, y], 1)]
    return torch.cat(out, 0)


def _joined(a: torch.Tensor, b: torch.Tensor, parts: int, dim: int) -> torch.Tensor:
    """A's and B's entries side by side along `dim`, per part."""
    return torch.cat([t for pair in zip(a.chunk(parts, dim), b.chunk(parts, dim)) for t in pair], dim)


@dataclass
class MixturePlan(Plan):
    init: str = "orthogonal"
    scale: float = 1.0

    def change(self) -> str:
        o, n = self.old, self.new
        return f"width x2 from two models, h {o.hidden_size} -> {n.hidden_size}, ffn {o.ffn_hidden_size} -> " \
               f"{n.ffn_hidden_size}, heads {o.num_attention_heads} -> {n.num_attention_heads}"

    def report(self) -> str:
        return f"{self.change()}, query groups {query_groups(self.old)} -> {query_groups(self.new)}; mixed blocks " \
               f"init={self.init} scale={self.scale:g}; output layer: the mean of the two models' logits"


class MixtureView(DerivedView):
    """The grown model over the first model's view (`inner`) and the second's."""

    def __init__(self, first: CheckpointView, second: CheckpointView, plan: MixturePlan, args, seed: int):
        super().__init__(first, args)
        self.second, self.plan, self.seed = second, plan, seed
        # Both models were trained for this one: a budget counts their FLOPs (scheduling.pair).
        flops = "num_floating_point_operations_so_far"
        self.extra = {**first.extra, flops: first.extra.get(flops, 0) + second.extra.get(flops, 0)}
        self.gated = plan.old.swiglu

    def _grow(self, name: str, a: torch.Tensor, b: torch.Tensor, power: int, coef) -> torch.Tensor:
        """One tensor (power 1: weights, first moments; 2: second moments); coef None: mixed blocks zero."""
        parts = 2 if self.gated and name.endswith(("linear_fc1.weight", "linear_fc1.bias")) else 1
        x, y = a.float(), b.float()
        if name.endswith(_JOINED_ROWS):
            half = 0.5 ** power if name == "output_layer.weight" else 1.0  # the mean of the two logits
            out = _joined(x * half, resize_vocab_rows(y, x.shape[0]) * half, 1, 1)
        elif x.dim() == 2:
            out = _mixed(x, y, torch.zeros(2, 2) if coef is None else coef, parts)
        elif x.dim() == 1:
            out = _joined(x, y, parts, 0)
        else:
            raise GrowthError(f"mixture does not know how to grow {name}")
        return out.to(a.dtype)

    def _unit(self, first: Unit, second: Unit, prefix: str) -> Unit:
        out: Unit = {"model": {}}
        for name, a in first["model"].items():
            coef = coefficients(self.seed, prefix + name, self.plan.init, self.plan.scale)
            out["model"][name] = weight = self._grow(name, a, second["model"][name], 1, coef)
            for state in self.optimizer_states:
                if name not in first.get(state, {}) or name not in second.get(state, {}):
                    continue
                main = state in _MAIN_COPIES  # fp32 copies: the weights' formula on each model's own copy
                out.setdefault(state, {})[name] = self._grow(name, first[state][name], second[state][name],
                                                             2 if state == "exp_avg_sq" else 1, coef if main else None)
        return out

    def read_globals(self) -> Unit:
        return self._unit(self.inner.read_globals(), self.second.read_globals(), "")

    def read_layer(self, index: int) -> Unit:
        return self._unit(self.inner.read_layer(index), self.second.read_layer(index), f"decoder.layers.{index}.")

    def close(self) -> None:
        super().close()
        self.second.close()


class Mixture(Operator):
    name, kind, preserves_function, sources = "mixture", "width", False, 2
    summary = "MixtureGrowth: width x2 from two trained models (--load-second), theirs on the diagonal blocks, " \
              "new combinations of both off it"
    params = "init=orthogonal|random|zero (the mixed blocks' coefficients), scale=FLOAT (default 1)"
    takes = ("init", "scale")

    def plan(self, params: dict[str, str], old: ModelShape, new: ModelShape) -> MixturePlan:
        init = params.get("init") or "orthogonal"
        if init not in INITS:
            raise GrowthError(f"mixture: init={init} is not one of {', '.join(INITS)}")
        try:
            scale = float(params.get("scale") or 1)
        except ValueError:
            raise GrowthError(f"mixture: scale={params['scale']!r} is not a number") from None
        for flag, key, value in (("--hidden-size", "hidden_size", new.hidden_size),
                                 ("--ffn-hidden-size", "ffn_hidden_size", new.ffn_hidden_size),
                                 ("--num-attention-heads", "num_attention_heads", new.num_attention_heads),
                                 ("--num-query-groups", "num_query_groups", query_groups(new))):
            want = 2 * (query_groups(old) if key == "num_query_groups" else getattr(old, key))
            if value != want:
                raise GrowthError(f"mixture doubles every width: {flag} must be {want} (2 x {want // 2}), not {value}")
        if new.kv_channels != old.kv_channels:
            raise GrowthError(f"mixture keeps the head size {old.kv_channels} (heads double in number)")
        if tied(old):
            raise GrowthError("mixture: tied embeddings cannot hold both models' embeddings and halve the output "
                              "layer; untie them (--untie-embeddings-and-output-weights)")
        if old.qk_layernorm:
            raise GrowthError("mixture: the --qk-layernorm norms (one per head size, shared by every head) cannot "
                              "hold two models")
        return MixturePlan(self, old, new, init, scale)

    def configure(self, plan: Plan, args, source: CheckpointView) -> list[str]:
        for key in WIDTH_FIELDS + ("group_query_attention", "kv_channels"):
            setattr(args, key, getattr(plan.new, key))
        return []

    def view(self, source, plan, args, seed, *, save, force, data_path=None, second=None) -> CheckpointView:
        return MixtureView(source, second, plan, args, seed)


def check_pair(first: CheckpointView, second: CheckpointView, where: str) -> None:
    """Refuse a second model of another shape (or vocabulary) than the first, naming the first difference."""
    a, b = ModelShape.from_args(first.args), ModelShape.from_args(second.args)
    for f in fields(ModelShape):
        if f.name != "seq_length" and getattr(a, f.name) != getattr(b, f.name):
            raise GrowthError(f"{where}: its {f.name} is {getattr(b, f.name)}, the first model's "
                              f"{getattr(a, f.name)} (mixture recombines two models of the same shape)")
