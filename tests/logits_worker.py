"""torchrun worker: load a checkpoint into megatron-core GPTModels at its own TP/PP (and model chunks per
pipeline rank) and save the logits.

Usage: torchrun --nproc-per-node TP*PP tests/logits_worker.py CHECKPOINT_ROOT OUT.pt
The logits of fixed tokens (vocabulary gathered over TP, padding rows dropped) are saved by the
last rank, so checkpoints of any layout can be compared tensor for tensor.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import megagrow  # noqa: E402,F401  (first: its init defers torch's compiler import, runtime/deferred_compile.py)
import torch  # noqa: E402
from megatron.core import parallel_state  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402

from megagrow.checkpoint.io import open_checkpoint  # noqa: E402
from megagrow.checkpoint.trainer import load_checkpoint  # noqa: E402
from megagrow.model.gpt import build_gpt_model, transformer_config  # noqa: E402
from megagrow.model.growth_masks import install_growth_masks  # noqa: E402
from megagrow.runtime.distributed import destroy, initialize_distributed, is_last_rank, set_seeds  # noqa: E402


class _Wrapped:
    def __init__(self, module):
        self.module = module


def main(root: str, out: str) -> None:
    view = open_checkpoint(root)
    args = view.args
    view.close()
    args.no_load_optim = args.no_load_rng = True
    args.finetune = False
    args.data_parallel_size = 1
    args.transformer_impl = None  # whichever spec this machine has: checkpoints are spec-independent here
    # Megatron-LM records only the padded vocabulary; its rows past the tokenizer's are padding.
    args.tokenizer_vocab_size = getattr(args, "tokenizer_vocab_size", args.padded_vocab_size)
    vpp = getattr(args, "virtual_pipeline_model_parallel_size", None)
    initialize_distributed(args.tensor_model_parallel_size, args.pipeline_model_parallel_size, "gloo",
                           virtual_pipeline_size=vpp)
    set_seeds(args.seed)
    config = transformer_config(args)
    chunks = [build_gpt_model(args, config, args.tokenizer_vocab_size, vp) for vp in (range(vpp) if vpp else [None])]
    iteration, _, run_state = load_checkpoint(root, [_Wrapped(c) for c in chunks], None, None, args)
    model = chunks[0]
    install_growth_masks(model, args, run_state, iteration)  # masked width growth: as the trainer would resume it
    for chunk in chunks:
        chunk.eval()
    g = torch.Generator().manual_seed(0)
    vocab = args.tokenizer_vocab_size
    tokens = torch.randint(0, vocab, (2, 32), generator=g)
    batch = {"tokens": tokens, "position_ids": torch.arange(32).expand(2, 32)}
    logits = []

    def forward_step(data_iterator, model):
        b = next(data_iterator)
        output = model(b["tokens"], b["position_ids"], None)

        def keep(output_tensor):
            logits.append(output_tensor.detach())
            return output_tensor.sum() * 0, {}
        return output, keep

    with torch.no_grad():
        # the interleaved schedule (a virtual pipeline) runs whole rounds of PP microbatches: the first is kept
        n = args.pipeline_model_parallel_size if vpp else 1
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=[iter([batch] * n) for _ in chunks]
                                    if vpp else iter([batch]), model=chunks, num_microbatches=n, seq_length=32,
                                    micro_batch_size=2, forward_only=True)
    if parallel_state.is_pipeline_last_stage():
        local = logits[0].contiguous()
        parts = [torch.empty_like(local) for _ in range(parallel_state.get_tensor_model_parallel_world_size())]
        torch.distributed.all_gather(parts, local, group=parallel_state.get_tensor_model_parallel_group())
        full = torch.cat(parts, dim=-1)[..., :vocab]
        if is_last_rank():
            torch.save(full, out)
    destroy()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
