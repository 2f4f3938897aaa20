# Shared by the launch scripts (sourced, not run).
#
#   NPROC_PER_NODE   workers per node (default: the GPUs of this node, from nvidia-smi)
#   MEGATRONISH_CPU  set to 1 to run gloo ranks on CPUs without GPUs (debugging, tests): no GPU check,
#                    NPROC_PER_NODE defaults to 2
#   TORCHRUN_ARGS    extra torchrun flags, e.g. "--max-restarts 3 --shutdown-timeout 110"
#   TRAIN_SCRIPT     the entry point (default: pretrain_gpt.py; anything that takes its flags)

REPO=${REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
TRAIN_SCRIPT=${TRAIN_SCRIPT:-$REPO/pretrain_gpt.py}
read -r -a TORCHRUN_EXTRA <<< "${TORCHRUN_ARGS:-}"

count_gpus() {
    { nvidia-smi -L 2>/dev/null || true; } | grep -c '^GPU' || true
}

# Sets NPROC_PER_NODE; exits with a message when the GPUs it needs are not there.
require_gpus() {  # require_gpus SCRIPT_NAME [MINIMUM]
    if [ "${MEGATRONISH_CPU:-0}" = 1 ]; then
        NPROC_PER_NODE=${NPROC_PER_NODE:-2}
        return
    fi
    local have need
    have=$(count_gpus)
    NPROC_PER_NODE=${NPROC_PER_NODE:-$have}
    need=$(( ${2:-1} > NPROC_PER_NODE ? ${2:-1} : NPROC_PER_NODE ))
    if [ "$have" -lt "$need" ]; then
        echo "$1: error: needs $need GPU(s) on this node and nvidia-smi finds $have. On a machine" \
             "without GPUs train the demo (torchrun --nproc_per_node 2 pretrain_gpt.py --tp 2), or set" \
             "MEGATRONISH_CPU=1 to run this script's job as gloo ranks on the CPU (slow)." >&2
        exit 1
    fi
}
