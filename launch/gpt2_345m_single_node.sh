#!/usr/bin/env bash
# GPT-2 345M (24 layers, hidden 1024, 16 heads, sequence 1024) on one node of 8 GPUs, TP=8.
#
#   bash launch/gpt2_345m_single_node.sh DATA_PREFIX VOCAB_JSON MERGES_TXT [CHECKPOINT_DIR]
#
# DATA_PREFIX is an indexed dataset written by tools/preprocess_data.py with the GPT-2 BPE
# tokenizer (e.g. data/my-corpus_text_document, without .bin/.idx). VOCAB_JSON and MERGES_TXT are
# GPT-2's vocab.json and merges.txt. Checkpoints go to CHECKPOINT_DIR (default checkpoints/gpt2-345m)
# every 1000 iterations; rerunning the same command resumes from the newest one.
# The flags are Megatron-LM's GPT-2 example flags: extra arguments after the fourth are passed on
# (e.g. --use-distributed-optimizer, --sequence-parallel, --tensorboard-dir runs/345m).
# Without 8 GPUs it stops with a message before starting anything. TORCHRUN_ARGS adds torchrun flags.
set -euo pipefail
DATA_PREFIX=${1:?usage: $0 DATA_PREFIX VOCAB_JSON MERGES_TXT [CHECKPOINT_DIR] [extra flags]}
VOCAB=${2:?vocab.json missing}
MERGES=${3:?merges.txt missing}
CHECKPOINTS=${4:-checkpoints/gpt2-345m}
shift $(( $# < 4 ? $# : 4 ))
source "$(dirname "$0")/common.sh"
require_gpus "$(basename "$0")" 8  # 8 CPU ranks of a 345M bf16 model would only exhaust the memory

exec torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" "${TORCHRUN_EXTRA[@]}" "$TRAIN_SCRIPT" \
    --tensor-model-parallel-size 8 \
    --num-layers 24 --hidden-size 1024 --num-attention-heads 16 \
    --seq-length 1024 --max-position-embeddings 1024 \
    --micro-batch-size 8 --global-batch-size 64 \
    --lr 0.00015 --min-lr 1.0e-5 --lr-decay-style cosine --lr-decay-iters 320000 --lr-warmup-fraction 0.01 \
    --train-iters 500000 --weight-decay 1e-2 --clip-grad 1.0 --bf16 \
    --data-path "$DATA_PREFIX" --vocab-file "$VOCAB" --merge-file "$MERGES" --split 949,50,1 \
    --log-interval 100 --eval-interval 1000 --eval-iters 10 \
    --save "$CHECKPOINTS" --load "$CHECKPOINTS" --save-interval 1000 \
    "$@"
