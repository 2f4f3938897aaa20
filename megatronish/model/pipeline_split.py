"""Which transformer layers each pipeline stage (and each of its virtual chunks) holds.

Layers are numbered globally, so a layer has the same name, initial value and checkpoint key
at every PP size. The split is Megatron's:
  - even: stage r holds layers [r L/p, (r+1) L/p);
  - uneven: `num_layers_in_first_pipeline_stage` / `..._last_...` fix the first and last stage,
    and the stages between share the rest evenly;
  - interleaved (v virtual chunks per stage): the layers form p*v chunks of L/(p v) layers in
    pipeline order, and chunk c of stage r is chunk c*p + r of that order, so a micro-batch
    visits stage 0, 1, ..., p-1, then stage 0 again (its second chunk), and so on.
"""

from megatronish.model.config import TransformerConfig


def validate_pipeline_split(config: TransformerConfig, pp: int, virtual_pp: int | None = None) -> None:
    """Raise ValueError (naming the values and the fix) when the layers cannot be split this way."""
    first, last = config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage
    layers = config.num_layers
    uneven = first is not None or last is not None
    if uneven and pp == 1:
        raise ValueError("num_layers_in_first/last_pipeline_stage (--decoder-first/last-pipeline-num-layers) need "
                         "a pipeline-model-parallel size > 1: drop them or raise the pipeline size")
    if uneven and virtual_pp:
        raise ValueError("an uneven pipeline split (--decoder-first/last-pipeline-num-layers) and virtual stages "
                         "cannot be combined here: use one of them")
    if virtual_pp:
        if layers % (pp * virtual_pp) != 0:
            raise ValueError(
                f"num_layers {layers} is not divisible by pipeline size {pp} x virtual stages {virtual_pp} = "
                f"{pp * virtual_pp}: choose a layer count that is a multiple of {pp * virtual_pp}, or fewer virtual "
                "stages (--num-layers-per-virtual-pipeline-stage must divide num_layers / pipeline size)")
        return
    if not uneven:
        if layers % pp != 0:
            raise ValueError(
                f"num_layers {layers} is not divisible by the pipeline-model-parallel size {pp}: choose a multiple "
                f"of {pp}, or give --decoder-first-pipeline-num-layers / --decoder-last-pipeline-num-layers")
        return
    middle_stages = pp - (first is not None) - (last is not None)
    rest = layers - (first or 0) - (last or 0)
    if min(first or 0, last or 0) < 0 or rest < 0:
        raise ValueError(f"first/last pipeline stage layers ({first}, {last}) must be >= 0 and leave at most "
                         f"num_layers {layers} for the other stages")
    if middle_stages == 0 and rest != 0:
        raise ValueError(f"the first ({first}) and last ({last}) pipeline stages hold {layers - rest} layers, but "
                         f"num_layers is {layers}: make them add up to {layers}")
    if middle_stages > 0 and (rest == 0 or rest % middle_stages != 0):
        raise ValueError(
            f"after the first/last stage layers ({first}, {last}), {rest} of num_layers {layers} remain for "
            f"{middle_stages} middle stage(s), which must split them evenly (at least one each): adjust "
            "--decoder-first/last-pipeline-num-layers")


def stage_layers(config: TransformerConfig, pp: int, pp_rank: int, virtual_pp: int | None = None,
                 vp_stage: int = 0) -> range:
    """The global layer numbers of pipeline stage `pp_rank`, chunk `vp_stage` (validated first)."""
    validate_pipeline_split(config, pp, virtual_pp)
    layers = config.num_layers
    if virtual_pp:
        per_chunk = layers // (pp * virtual_pp)
        start = (vp_stage * pp + pp_rank) * per_chunk
        return range(start, start + per_chunk)
    first, last = config.num_layers_in_first_pipeline_stage, config.num_layers_in_last_pipeline_stage
    if first is None and last is None:
        per_stage = layers // pp
        return range(pp_rank * per_stage, (pp_rank + 1) * per_stage)
    counts = _uneven_counts(layers, pp, first, last)
    start = sum(counts[:pp_rank])
    return range(start, start + counts[pp_rank])


def _uneven_counts(layers: int, pp: int, first: int | None, last: int | None) -> list[int]:
    middle_stages = pp - (first is not None) - (last is not None)
    rest = layers - (first or 0) - (last or 0)
    per_middle = rest // middle_stages if middle_stages else 0
    counts = [per_middle] * pp
    if first is not None:
        counts[0] = first
    if last is not None:
        counts[-1] = last
    return counts
