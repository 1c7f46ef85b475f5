#!/usr/bin/env bash
# LAG's experiment on the embedded corpus (docs/lag_study.md): train a 4-layer model, grow it to 6
# layers with every operator of LAG's design space (12 candidates), train each to the end and
# analyse how well the loss after t iterations predicts the final loss.
# Output under runs/lag_study/ (override with OUT=...). About 15 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh > /dev/null
. .venv/bin/activate
OUT=${OUT:-runs/lag_study}
STEPS=${STEPS:-300}
python -c "from megagrow.data.prepare import prepare_data; prepare_data('$OUT/data')"
if [ ! -f "$OUT/source/latest_checkpointed_iteration.txt" ]; then
  torchrun --nproc-per-node 1 pretrain_gpt.py \
    --num-layers 4 --hidden-size 128 --ffn-hidden-size 512 --num-attention-heads 4 \
    --position-embedding-type rope --normalization RMSNorm --untie-embeddings-and-output-weights \
    --seq-length 128 --micro-batch-size 8 --global-batch-size 16 --train-iters 200 \
    --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.1 \
    --hidden-dropout 0 --attention-dropout 0 \
    --data-path "$OUT/data/corpus_text_document" --split 98,1,1 --data-cache-path "$OUT/data/cache" \
    --tokenizer-type GPTSentencePieceTokenizer --tokenizer-model "$OUT/data/tokenizer.model" \
    --save "$OUT/source" --eval-interval 1000 --eval-iters 4 --log-interval 50
fi
megagrow lag study --load "$OUT/source" --num-layers 6 --steps "$STEPS" --output "$OUT/study" \
  --groups 2 --nproc 1 --eval-interval $((STEPS / 20))
