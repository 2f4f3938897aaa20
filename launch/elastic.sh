#!/usr/bin/env bash
# Elastic training: run this same command on every node; nodes may leave and join while the job runs.
#
#   MIN_NODES=1 MAX_NODES=4 RDZV_HOST=node0 bash launch/elastic.sh --tp 8 --global-batch-size 512 \
#       --save /shared/ckpt --load /shared/ckpt --local-checkpoint-interval 10 --local-checkpoint-dir /local/ckpt ...
#
# torchrun's elastic agents (c10d rendezvous on RDZV_HOST:RDZV_PORT: keep it on a node that stays for the
# whole job) restart every worker when the membership changes; each worker takes the layout for the new world
# size (--tp/--pp kept, DP follows; --layout auto: the planner's choice), resumes from the newest durable or
# local checkpoint and logs what the restart cost (megatronish/training/elastic.py). Workers of a world that
# no layout fits wait up to WAIT_MINUTES for more nodes. A node told to leave (SIGTERM) saves before it goes.
# Give --global-batch-size explicitly: it must stay the same at every world size.
#
# Fault-tolerant DP instead (FT=1; pip install 'megatronish[ft]'): each node runs one replica (NPROC_PER_NODE
# = TP x PP ranks, a standalone torchrun) of a torchft quorum, numbered REPLICA_ID; the node with
# START_LIGHTHOUSE=1 also runs the lighthouse on RDZV_HOST:LIGHTHOUSE_PORT (megatronish/training/fault_tolerance.py):
#   FT=1 REPLICA_ID=0 START_LIGHTHOUSE=1 RDZV_HOST=node0 bash launch/elastic.sh --tp 8 ...   # on node0
#   FT=1 REPLICA_ID=1 RDZV_HOST=node0 bash launch/elastic.sh --tp 8 ...                      # on node1, ...
# launch/common.sh lists the other knobs (NPROC_PER_NODE, TORCHRUN_ARGS, MEGATRONISH_CPU, TRAIN_SCRIPT).
set -euo pipefail
RDZV_HOST=${RDZV_HOST:?set RDZV_HOST (hostname or IP of a node that stays for the whole job)}
RDZV_PORT=${RDZV_PORT:-29400}
MIN_NODES=${MIN_NODES:-1}
MAX_NODES=${MAX_NODES:-4}
MAX_RESTARTS=${MAX_RESTARTS:-100}      # failures (a lost node costs one); nodes joining do not count
WAIT_MINUTES=${WAIT_MINUTES:-30}
LAST_CALL_SECONDS=${LAST_CALL_SECONDS:-10}  # once MIN_NODES are there, wait this long for more to join
RUN_ID=${RUN_ID:-megatronish-elastic}
LIGHTHOUSE_PORT=${LIGHTHOUSE_PORT:-29510}
source "$(dirname "$0")/common.sh"
require_gpus "$(basename "$0")"

if [ "${FT:-0}" = 1 ]; then
    if [ "${START_LIGHTHOUSE:-0}" = 1 ]; then
        torchft_lighthouse --min_replicas 1 --bind "0.0.0.0:$LIGHTHOUSE_PORT" --join_timeout_ms 30000 &
        trap 'kill $!' EXIT
    fi
    torchrun --standalone --nproc_per_node "$NPROC_PER_NODE" "${TORCHRUN_EXTRA[@]}" "$TRAIN_SCRIPT" \
        --fault-tolerant-dp --ft-lighthouse "http://$RDZV_HOST:$LIGHTHOUSE_PORT" \
        --ft-replica-id "${REPLICA_ID:?set REPLICA_ID (0, 1, ...: one per replica)}" "$@"
    exit
fi

# torch 2.13's agents share one store with their workers, made in the first rendezvous round only: a node
# joining later waits forever for its address. Without sharing, every round's workers start a store of their own.
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export MEGATRONISH_ELASTIC_STORE="$RDZV_HOST:$RDZV_PORT"  # the restart reports keep their facts in that store
exec torchrun --nnodes "$MIN_NODES:$MAX_NODES" --nproc_per_node "$NPROC_PER_NODE" --max-restarts "$MAX_RESTARTS" \
    --rdzv_backend c10d --rdzv_endpoint "$RDZV_HOST:$RDZV_PORT" --rdzv_id "$RUN_ID" \
    --rdzv_conf "last_call_timeout=$LAST_CALL_SECONDS" "${TORCHRUN_EXTRA[@]}" \
    "$TRAIN_SCRIPT" --wait-for-nodes-minutes "$WAIT_MINUTES" "$@"
