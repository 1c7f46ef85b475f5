"""Growth masks: new width held behind masks that open during training (MSG; paper 002's PDG, eq. 7).

A width-grown checkpoint (`--op msg:steps=N` / `pdg:steps=N`) records in its args which indices are
new (those past the small model's hidden size, FFN size and heads) and the iterations G_b..G_e over
which they open. While open < 1 the trainer multiplies, per layer:
- the embedding output and every norm output by the hidden mask C (norm statistics are taken over
  C-weighted dims, so the small model's statistics are kept while new dims are closed),
- attention and MLP outputs (and their biases) by C before the residual add,
- the inputs of linear_proj and linear_fc2 by the head and FFN-unit masks.
At G_b every new index is 0, so the grown model computes the small model's function whatever the new
weights are. `msg` ramps all new indices together, 0 -> 1 over N steps; `pdg` opens
r = floor((new - old) / N) indices per step, in order (eq. 5-6; evenly spread when fewer than N are
new, as heads often are), and all of them at G_e. Once fully
open the hooks are removed and the record dropped: the model is a plain GPTModel again.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state

from megagrow.model.shape import kv_channels

MASK_KINDS = ("msg", "pdg")


def mask_values(kind: str, old: int, new: int, begin: int, end: int, iteration: int) -> torch.Tensor:
    """The mask over `new` indices (the first `old` always 1) at `iteration` (steps done)."""
    values = torch.ones(new)
    if iteration >= end or new == old:
        return values
    done = max(iteration - begin, 0)
    if kind == "msg":
        values[old:] = done / (end - begin)
    else:
        rate = (new - old) // (end - begin)  # eq. 5; fewer new indices than steps: open them evenly
        opened = rate * done if rate else (new - old) * done // (end - begin)
        values[old + opened:] = 0.0
    return values


def _unwrap(model):
    while hasattr(model, "module"):
        model = model.module
    return model


class GrowthMasks:
    """Hooks on one pipeline stage's GPTModel; `set_iteration` before each step, `remove` when open."""

    def __init__(self, model, args, run_state: dict):
        self.record, self.args, self.run_state = run_state["growth_masks"], args, run_state
        self.model = _unwrap(model)
        self.handles: list = []
        self.hidden = self.heads = self.units = None
        config = self.model.config
        self.rms = config.normalization == "RMSNorm"
        self.eps = config.layernorm_epsilon
        self.gamma_offset = 1.0 if config.layernorm_zero_centered_gamma else 0.0  # --apply-layernorm-1p: 1 + weight
        gpt = self.model
        if gpt.pre_process:
            self.handles.append(gpt.embedding.register_forward_hook(lambda m, i, o: o * self._c(o)))
        for layer in gpt.decoder.layers:
            if type(layer.input_layernorm).__name__ == "IdentityOp":
                raise ValueError("growth masks need norms as separate modules (--transformer-impl local); the "
                                 "Transformer Engine spec fuses them into the linear layers")
            for norm in (layer.input_layernorm, layer.pre_mlp_layernorm):
                self.handles.append(norm.register_forward_hook(self._masked_norm))
            for block in (layer.self_attention, layer.mlp):
                self.handles.append(block.register_forward_hook(self._mask_output))
            self.handles.append(layer.self_attention.linear_proj.register_forward_pre_hook(
                lambda m, i: (i[0] * self.heads.to(i[0].dtype),) + i[1:]))
            self.handles.append(layer.mlp.linear_fc2.register_forward_pre_hook(
                lambda m, i: (i[0] * self.units.to(i[0].dtype),) + i[1:]))
        if gpt.post_process and getattr(gpt.decoder, "final_layernorm", None) is not None:
            self.handles.append(gpt.decoder.final_layernorm.register_forward_hook(self._masked_norm))

    def _c(self, x: torch.Tensor) -> torch.Tensor:
        return self.hidden.to(device=x.device, dtype=x.dtype)

    def _masked_norm(self, module, inputs, output):
        x = inputs[0].float()
        c = self.hidden.to(x.device)
        total = c.sum()
        if not self.rms:
            x = x - (x * c).sum(-1, keepdim=True) / total
        y = x * torch.rsqrt((x * x * c).sum(-1, keepdim=True) / total + self.eps)
        y = y * (module.weight.float() + self.gamma_offset)
        if getattr(module, "bias", None) is not None:
            y = y + module.bias.float()
        return (y * c).to(output.dtype)

    def _mask_output(self, module, inputs, output):
        out, bias = output
        return out * self._c(out), None if bias is None else bias * self._c(bias)

    def set_iteration(self, iteration: int) -> bool:
        """Set the masks for the step after `iteration`; returns False (and removes the hooks) once open."""
        r, a = self.record, self.args
        if iteration >= r["end"]:
            self.remove()
            return False
        tp, rank = parallel_state.get_tensor_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_rank()

        def local(old: int, new: int, repeat: int = 1) -> torch.Tensor:
            full = mask_values(r["kind"], old, new, r["begin"], r["end"], iteration)
            return full.chunk(tp)[rank].repeat_interleave(repeat)
        device = next(self.model.parameters()).device
        self.hidden = mask_values(r["kind"], r["hidden_size"], a.hidden_size, r["begin"], r["end"], iteration).to(device)
        head_size = kv_channels(a)
        self.heads = local(r["num_attention_heads"], a.num_attention_heads, head_size).to(device)
        self.units = local(r["ffn_hidden_size"], a.ffn_hidden_size).to(device)
        return True

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.run_state["growth_masks"] = None  # fully open: later checkpoints are plain


def install_growth_masks(model, args, run_state: dict, iteration: int) -> GrowthMasks | None:
    """Masks for a model loaded from a masked-growth checkpoint (its run state), set for `iteration`; None if
    there are none."""
    if not run_state.get("growth_masks"):
        return None
    masks = GrowthMasks(model, args, run_state)
    return masks if masks.set_iteration(iteration) else None
