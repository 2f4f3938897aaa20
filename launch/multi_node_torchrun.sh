#!/usr/bin/env bash
# Multi-node training with torchrun's c10d rendezvous: run this same command on every node.
#
#   NNODES=4 RDZV_HOST=node0.example.com bash launch/multi_node_torchrun.sh [pretrain_gpt.py flags...]
#
# RDZV_HOST is any one of the nodes (reachable by the others on RDZV_PORT, default 29400); each
# node starts one worker per GPU (NPROC_PER_NODE to choose; launch/common.sh lists the other knobs:
# TORCHRUN_ARGS, MEGATRONISH_CPU, TRAIN_SCRIPT). Ranks are numbered node by node, and megatronish
# puts tensor-parallel groups on adjacent ranks, so keep --tp <= the GPUs of a node: TP traffic then
# stays on NVLink and only the data-parallel gradient reduction crosses the network.
# Without flags it trains GPT-2 345M shapes on DATA_PREFIX/VOCAB/MERGES from the environment, TP =
# the GPUs of a node.
# Restarts: TORCHRUN_ARGS="--max-restarts 3" brings every node back from the newest checkpoint
# after a worker dies (each restart is a new rendezvous round that all nodes join).
# Example: NNODES=2 RDZV_HOST=10.0.0.1 DATA_PREFIX=data/owt_text_document VOCAB=gpt2/vocab.json \
#          MERGES=gpt2/merges.txt TORCHRUN_ARGS="--max-restarts 3" bash launch/multi_node_torchrun.sh
set -euo pipefail
NNODES=${NNODES:?set NNODES (number of nodes)}
RDZV_HOST=${RDZV_HOST:?set RDZV_HOST (hostname or IP of one node, the same on every node)}
RDZV_PORT=${RDZV_PORT:-29400}
RUN_ID=${RUN_ID:-megatronish-gpt}
source "$(dirname "$0")/common.sh"
require_gpus "$(basename "$0")"

if [ $# -eq 0 ]; then
    set -- --tp "$NPROC_PER_NODE" --num-layers 24 --hidden-size 1024 --num-attention-heads 16 \
        --seq-length 1024 --max-position-embeddings 1024 \
        --micro-batch-size 8 --global-batch-size $(( 64 * NNODES )) \
        --lr 0.00015 --min-lr 1.0e-5 --lr-decay-style cosine --lr-warmup-fraction 0.01 --train-iters 100000 \
        --weight-decay 1e-2 --clip-grad 1.0 --bf16 --use-distributed-optimizer \
        --data-path "${DATA_PREFIX:?set DATA_PREFIX}" --vocab-file "${VOCAB:?set VOCAB}" \
        --merge-file "${MERGES:?set MERGES}" \
        --save "${CHECKPOINTS:-checkpoints/multi-node}" --load "${CHECKPOINTS:-checkpoints/multi-node}" \
        --save-interval 1000 --log-interval 100 --eval-interval 1000 --eval-iters 10
fi

exec torchrun --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$RUN_ID" "${TORCHRUN_EXTRA[@]}" \
    "$TRAIN_SCRIPT" "$@"
