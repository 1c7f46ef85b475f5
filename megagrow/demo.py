"""`megagrow demo`: growth paying off on any machine, from nothing, in one command.

On the embedded corpus (or `--data JSONL`): build the tokenizer and dataset if absent, then train
- a scratch baseline of the target (8 layers, hidden 128) with DP=2, and
- a staged run under the same FLOPs budget: the 2-layer small model with TP=2 for the G_stack
  guideline's tokens (clamped), LAG@k choosing the operator into the target among stack:g=4 and
  interpolate:g=4, then the winner trained on with DP=2 to the budget (the losing probe's FLOPs count
  against the staged run; TP=2 would be slower here, gloo on 2 cores),
and report: loss vs FLOPs for both, the growth point, the LAG probe curves, and the headline
`speed-up: X.XX` (FLOPs the two runs need to reach the same validation loss, analysis.report) plus
the validation loss at equal FLOPs. Re-running the same command resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time

from megagrow.data.prepare import prepare_data
from megagrow.scheduling.plan import describe, dump_plan, make_plan

TARGET = {"num_layers": 8, "hidden_size": 128, "ffn_hidden_size": 512, "num_attention_heads": 4,
          "position_embedding_type": "rope", "normalization": "RMSNorm", "untie_embeddings_and_output_weights": True,
          "hidden_dropout": 0.0, "attention_dropout": 0.0}
FULL = {"tokens": 2e6, "lag_k": 40, "eval_interval": 25}
QUICK = {"tokens": 2.5e5, "lag_k": 10, "eval_interval": 10}


def demo(output: str = "runs/demo", data: str | None = None, quick: bool = False, vocab_size: int = 2048) -> dict:
    t0 = time.time()
    size = QUICK if quick else FULL
    print(f"megagrow demo: {'quick ' if quick else ''}staged G_stack run against training from scratch "
          f"(outputs in {output})", flush=True)
    flags = prepare_data(os.path.join(output, "data"), jsonl=data, vocab_size=vocab_size,
                         progress=lambda m: print(m, flush=True))
    from megagrow.data.tokenizer import build_tokenizer
    vocab = build_tokenizer("GPTSentencePieceTokenizer", flags["tokenizer_model"], None).vocab_size
    training = {"global_batch_size": 16, "micro_batch_size": 4, "seq_length": 128, "lr": 2e-3, "min_lr": 2e-4,
                "lr_decay_style": "cosine", "lr_warmup_iters": 10, "weight_decay": 0.1, "clip_grad": 1.0,
                "log_interval": 10, "eval_interval": size["eval_interval"], "eval_iters": 4, "save_interval": 100,
                "seed": 1234}
    plan = make_plan(TARGET, vocab, training, {**flags, "split": "98,1,1"}, tokens=size["tokens"],
                     growth_factor=4, max_small_fraction=0.5, parallel={"nproc": 2}, lag_k=size["lag_k"])
    plan.stages[0].parallel = {"tensor_model_parallel_size": 2, "nproc": 2}  # grown into DP=2
    print(describe(plan), flush=True)
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, "plan.yaml")
    with open(path, "w") as f:
        f.write(dump_plan(plan))
    from megagrow.scheduling.driver import run
    s = run(path, os.path.join(output, "run"), baseline=True)
    headline = (f"speed-up: {s['speedup']:.2f} (FLOPs to validation loss {s['common_loss']:.4f}: scratch "
                f"{s['baseline_flops_to_common_loss'] or s['baseline_flops']:.4g}, staged "
                f"{s['staged_flops_to_common_loss']:.4g})")
    equal = s.get("baseline_valid_loss_at_staged_flops")
    print(headline)
    if equal is not None:
        print(f"validation loss at equal FLOPs ({s['staged_flops']:.4g}): staged {s['staged_final_valid_loss']:.4f}, "
              f"scratch {equal:.4f}")
    print(f"report: {os.path.join(output, 'run', 'report.md')} ({time.time() - t0:.0f} s)")
    with open(os.path.join(output, "headline.json"), "w") as f:
        json.dump({**{k: s[k] for k in ("speedup", "common_loss", "staged_flops", "baseline_flops",
                                         "staged_final_valid_loss", "baseline_final_valid_loss")},
                   "baseline_valid_loss_at_staged_flops": equal, "seconds": time.time() - t0}, f, indent=1)
    return s
