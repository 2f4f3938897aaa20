"""Where peers should serve: the stage a new peer joins, and the one move that relieves the bottleneck.

A pipeline runs at the pace of its slowest stage, so the quantity to raise is the smallest stage
capacity, a stage's capacity being the sum of its serving peers' throughputs (samples per second
of that stage's forward and backward work). Every peer evaluates the same rule on the peer
table it reads from the DHT, and only the peer the rule names moves:
    - take the stage with the most capacity (over-served) and the one with the least (under-served);
    - the over-served stage's slowest peer (it helps its stage least) moves to the under-served one
      if that raises the smallest capacity by more than `min_gain` (a fraction);
    - its throughput there is estimated as a peer's speed over the stage's cost per sample, with
      the cost ratio of two stages taken from their peers' mean throughputs (the stages of a GPT do
      not cost the same: the first embeds, the last computes the loss, and a peer recomputes the
      forward in backward on every stage but the last);
    - a stage keeps at least one peer, and nothing moves while a peer's throughput is unmeasured.
The SWARM paper's reference code left rebalancing out ("not yet added"); this is the rule its text
describes: peers move from the most over-served to the most under-served stage.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    peer_id: str
    from_stage: int
    to_stage: int
    capacities: tuple   # stage capacities (samples/s) before the move
    after: tuple        # ... and as estimated after it


def stage_capacities(throughputs: dict[int, dict[str, float | None]], num_stages: int) -> list[float]:
    """Sum of the known throughputs per stage (unmeasured peers count as the average measured peer)."""
    known = [t for stage in throughputs.values() for t in stage.values() if t]
    default = sum(known) / len(known) if known else 1.0
    return [sum(t or default for t in throughputs.get(stage, {}).values()) for stage in range(num_stages)]


def choose_stage(throughputs: dict[int, dict[str, float | None]], num_stages: int) -> int:
    """The stage a new peer should serve: one without peers (the first such), else the least capacity."""
    capacities = stage_capacities(throughputs, num_stages)
    empty = [stage for stage in range(num_stages) if not throughputs.get(stage)]
    return empty[0] if empty else min(range(num_stages), key=lambda stage: (capacities[stage], stage))


def choose_move(throughputs: dict[int, dict[str, float | None]], num_stages: int, min_gain: float) -> Move | None:
    """The one peer that should change stage now, or None. `throughputs`: stage -> {peer id: samples/s}."""
    if num_stages < 2 or any(t is None for stage in throughputs.values() for t in stage.values()):
        return None
    capacities = stage_capacities(throughputs, num_stages)
    over = max(range(num_stages), key=lambda stage: (capacities[stage], -stage))
    under = min(range(num_stages), key=lambda stage: (capacities[stage], stage))
    peers = throughputs.get(over, {})
    if over == under or len(peers) < 2:
        return None
    peer_id, speed = min(peers.items(), key=lambda item: (item[1], item[0]))
    after = list(capacities)
    after[over] -= speed
    after[under] += speed * _mean(throughputs.get(under, {})) / _mean(peers) if throughputs.get(under) else speed
    if min(after) <= min(capacities) * (1 + min_gain):
        return None
    return Move(peer_id, over, under, tuple(capacities), tuple(after))


def _mean(peers: dict[str, float]) -> float:
    return sum(peers.values()) / len(peers)
