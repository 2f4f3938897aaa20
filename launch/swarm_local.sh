#!/usr/bin/env bash
# SWARM on one machine: a bootstrap DHT node, PEERS_PER_STAGE peers for each of STAGES stages and
# TRAINERS trainers, all on 127.0.0.1; every process in a session of its own, logs in $WORKDIR.
# Extra arguments go to every peer and trainer (pretrain_gpt.py's model, optimizer and data flags).
#
#   bash launch/swarm_local.sh                                  # the demo GPT on 2 stages x 2 peers, 1 trainer
#   STAGES=2 PEERS_PER_STAGE=3 TRAINERS=2 bash launch/swarm_local.sh --train-iters 500 --save ckpt --load ckpt
#
# It returns when the trainers are done; then (or on Ctrl-C) the peers leave gracefully (SIGTERM:
# they finish the steps they hold parts of), and whatever is still running after GRACE seconds is
# killed with its whole process group (a peer's p2p daemon included).
set -euo pipefail
cd "$(dirname "$0")/.."
STAGES=${STAGES:-2}
PEERS_PER_STAGE=${PEERS_PER_STAGE:-2}
TRAINERS=${TRAINERS:-1}
GRACE=${GRACE:-30}
WORKDIR=${WORKDIR:-swarm-run}
export PYTHONPATH=${PYTHONPATH:-$PWD}
# 2 cores shared by all the processes here: one torch thread each.
export MEGATRONISH_NUM_THREADS=${MEGATRONISH_NUM_THREADS:-1}
mkdir -p "$WORKDIR"
rm -f "$WORKDIR/bootstrap.addr"

peers=()
trainers=()
dht=
stop() {
  for pid in "${peers[@]}" "${trainers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  local deadline=$((SECONDS + GRACE))
  for pid in "${peers[@]}" "${trainers[@]}"; do
    while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.5; done
  done
  for pid in "${peers[@]}" "${trainers[@]}" $dht; do kill -KILL -- "-$pid" 2>/dev/null || true; done
}
trap stop EXIT

setsid python tools/swarm_dht.py --address-file "$WORKDIR/bootstrap.addr" > "$WORKDIR/dht.log" 2>&1 &
dht=$!
for _ in $(seq 120); do [ -s "$WORKDIR/bootstrap.addr" ] && break; sleep 0.5; done
[ -s "$WORKDIR/bootstrap.addr" ] || { echo "the bootstrap DHT node did not start: see $WORKDIR/dht.log" >&2; exit 1; }
BOOTSTRAP=$(cat "$WORKDIR/bootstrap.addr")
echo "bootstrap: $BOOTSTRAP (logs in $WORKDIR/)"

for stage in $(seq 0 $((STAGES - 1))); do
  for i in $(seq 0 $((PEERS_PER_STAGE - 1))); do
    setsid python tools/swarm_peer.py --initial-peers "$BOOTSTRAP" --pp "$STAGES" --stage "$stage" "$@" \
      > "$WORKDIR/peer-$stage-$i.log" 2>&1 &
    peers+=($!)
  done
done
for i in $(seq 0 $((TRAINERS - 1))); do
  setsid python tools/swarm_trainer.py --initial-peers "$BOOTSTRAP" --pp "$STAGES" \
    --num-trainers "$TRAINERS" --trainer-index "$i" "$@" > "$WORKDIR/trainer-$i.log" 2>&1 &
  trainers+=($!)
done
echo "${#peers[@]} peers, ${#trainers[@]} trainer(s); following $WORKDIR/trainer-0.log"
tail -f "$WORKDIR/trainer-0.log" --pid "${trainers[0]}" | grep --line-buffered -E "step [0-9]+ \||peers|rerout|waits" || true
status=0
for pid in "${trainers[@]}"; do wait "$pid" || status=$?; done
exit $status
