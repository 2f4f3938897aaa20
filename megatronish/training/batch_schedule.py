"""The global batch size over training: constant, Megatron's --rampup-batch-size, or --step-batch-size-schedule.

    --rampup-batch-size START INCREMENT SAMPLES   the batch grows from START by INCREMENT in equal shares of the
                                                  first SAMPLES samples, then stays at --global-batch-size
    --step-batch-size-schedule "0:16 2.4B:320"    THRESHOLD:BATCH pairs; the batch is that of the last threshold
                                                  reached, thresholds in tokens (K, M, B, T suffixes), as Megatron
Each iteration runs global_batch(consumed samples) / (micro batch x DP) micro-batches, and the learning-rate
schedule advances by the batch it ran (it counts samples), so a ramp changes nothing else.
"""

import re

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}


class BatchSchedule:
    """global_batch(consumed_samples) -> the global batch size of the next iteration."""

    def __init__(self, global_batch_size: int, rampup: list[int] | None = None, steps: list[tuple] | None = None):
        self.global_batch_size, self.rampup, self.steps = global_batch_size, rampup, steps

    def global_batch(self, consumed_samples: int) -> int:
        if self.steps:
            return [batch for threshold, batch in self.steps if consumed_samples >= threshold][-1]
        if self.rampup:
            start, increment, samples = self.rampup
            if consumed_samples > samples:
                return self.global_batch_size
            per_increment = samples / ((self.global_batch_size - start) // increment)
            return start + int(consumed_samples / per_increment) * increment
        return self.global_batch_size

    def batches(self) -> set[int]:
        """Every batch size the schedule can give (to check each against micro batch x DP)."""
        if self.steps:
            return {batch for _, batch in self.steps}
        if self.rampup:
            start, increment, _ = self.rampup
            return set(range(start, self.global_batch_size + 1, increment))
        return {self.global_batch_size}

    def iterations_for(self, samples: int) -> int:
        """Iterations until `samples` samples are consumed (Megatron's train iters for --train-samples)."""
        consumed = iterations = 0
        while consumed < samples and self.global_batch(consumed) != self.global_batch_size:
            consumed += self.global_batch(consumed)
            iterations += 1
        if consumed >= samples:
            return iterations
        return iterations + -(-(samples - consumed) // self.global_batch_size)

    def samples_for(self, iterations: int) -> int:
        """Samples consumed by `iterations` iterations."""
        consumed = 0
        for done in range(iterations):
            batch = self.global_batch(consumed)
            if batch == self.global_batch_size:  # constant from here on
                return consumed + (iterations - done) * batch
            consumed += batch
        return consumed


def parse_step_schedule(text: str, seq_length: int) -> list[tuple[int, int]]:
    """"0:16 2.4B:320" -> [(0, 16), (2.4e9 // seq_length, 320)]: (threshold in samples, batch), sorted. Raises
    ValueError naming the bad entry."""
    steps = []
    for entry in text.replace(",", " ").split():
        threshold, _, batch = entry.partition(":")
        try:
            steps.append((_number(threshold) // seq_length, _number(batch)))
        except ValueError:
            raise ValueError(f"--step-batch-size-schedule entry {entry!r} must be THRESHOLD:BATCH, like 0:16 or "
                             "2.4B:320 (thresholds in tokens)") from None
    steps.sort()
    if not steps or steps[0][0] != 0 or any(b < 1 for _, b in steps) or len({t for t, _ in steps}) < len(steps):
        raise ValueError(f"--step-batch-size-schedule {text!r} must start at threshold 0, with increasing thresholds "
                         "and positive batch sizes")
    return steps


def _number(text: str) -> int:
    match = re.fullmatch(r"([0-9.]+)([KMBT]?)", text.strip().upper())
    if match is None:
        raise ValueError(text)
    return int(float(match.group(1)) * _SUFFIXES.get(match.group(2), 1))
