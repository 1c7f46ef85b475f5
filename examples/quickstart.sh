#!/usr/bin/env bash
# The main job on the embedded default, from nothing: set up .venv, turn the Python stdlib's source
# into a corpus, train a tokenizer, build Megatron's indexed dataset, then pre-train a small GPT
# with tensor parallelism 2 on two processes (gloo on CPU, NCCL on GPU), save, report validation loss.
# Output goes to runs/quickstart/ (override with OUT=...). Takes a few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
. .venv/bin/activate
OUT=${OUT:-runs/quickstart}
ITERS=${ITERS:-300}
mkdir -p "$OUT"

[ -f "$OUT/corpus.jsonl" ] || python tools/prepare_stdlib_corpus.py --output "$OUT/corpus.jsonl"
[ -f "$OUT/tokenizer.model" ] || python tools/train_tokenizer.py --input "$OUT/corpus.jsonl" \
    --model-prefix "$OUT/tokenizer" --vocab-size 4096
[ -f "$OUT/corpus_text_document.idx" ] || python tools/preprocess_data.py --input "$OUT/corpus.jsonl" \
    --output-prefix "$OUT/corpus" --tokenizer-type GPTSentencePieceTokenizer \
    --tokenizer-model "$OUT/tokenizer.model" --append-eod --workers 2

torchrun --nproc-per-node 2 pretrain_gpt.py \
    --tensor-model-parallel-size 2 --pipeline-model-parallel-size 1 \
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 512 --num-attention-heads 4 \
    --seq-length 128 --max-position-embeddings 128 \
    --micro-batch-size 4 --global-batch-size 16 \
    --train-iters "$ITERS" --lr 1e-3 --min-lr 1e-4 --lr-decay-style cosine --lr-warmup-iters 20 \
    --weight-decay 0.1 --clip-grad 1.0 --hidden-dropout 0.0 --attention-dropout 0.0 \
    --data-path "$OUT/corpus_text_document" --split 98,1,1 \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$OUT/tokenizer.model" \
    --save "$OUT/checkpoints" --load "$OUT/checkpoints" --save-interval 100 --ckpt-format torch_dist \
    --eval-interval 100 --eval-iters 5 --log-interval 20 \
    --tensorboard-dir "$OUT/tensorboard" --metrics-file "$OUT/metrics.jsonl"

python - "$OUT/metrics.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
valid = [r for r in rows if r["kind"] == "valid"]
train = [r for r in rows if r["kind"] == "train"]
print(f"quickstart: {len(train)} iterations, first train loss {train[0]['lm loss']:.3f}, "
      f"final validation loss {valid[-1]['lm loss']:.3f} (ppl {valid[-1]['ppl']:.1f})")
PY
