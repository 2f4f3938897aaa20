"""The schedules below the training loop, with two layouts side by side in one process.

- After one step at PP=2 (1F1B and interleaved), the gradient of every parameter equals that of
  a PP=1 model built from the same seed in the same process (fp32, 1e-6), and the parameter
  count over the stages equals the PP=1 model's.
- 1F1B never holds more than PP micro-batches' activations on a stage (counted: forwards whose
  backward has not run yet), while all m forwards before any backward would hold m.
- A TP=2 and a TP=1 model live side by side and give the same logits.
"""


import pytest
import torch

from megatronish import parallel_state
from megatronish.model import GPTModel, TransformerConfig
from megatronish.optimizer import DistributedDataParallel
from megatronish.parallel_layout import ParallelLayout
from megatronish.pipeline_parallel import get_forward_backward_func
from megatronish.testing import run_distributed
from megatronish.tensor_parallel import gather_from_tensor_model_parallel_region
from megatronish.training.training import count_parameters, forward_step

SEQ, MICRO_BATCH, VOCAB = 8, 2, 50


def _config(**options) -> TransformerConfig:
    return TransformerConfig(num_layers=4, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
                             max_position_embeddings=SEQ, hidden_dropout=0.0, attention_dropout=0.0, **options)


def _batches(count: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        tokens = torch.randint(0, VOCAB, (MICRO_BATCH, SEQ + 1), generator=generator)
        batches.append({"tokens": tokens[:, :-1], "labels": tokens[:, 1:],
                        "loss_mask": (torch.rand(MICRO_BATCH, SEQ, generator=generator) > 0.2).float()})
    return batches


def _pipeline_grads(virtual_pp, untied, num_microbatches):
    """{name: gradient} of this rank's parameters after one PP=2 step, and of the same parameters in a PP=1
    model built beside it (both ranks run the whole PP=1 model on the same micro-batches)."""
    config = _config(tie_word_embeddings=not untied)
    pipeline = ParallelLayout.build(pp=2, virtual_pp=virtual_pp)
    single = ParallelLayout.build()  # TP 1 x PP 1 x DP 2: a whole model on each rank
    batches = _batches(num_microbatches, seed=7)

    chunks = [DistributedDataParallel(GPTModel(config, seed=3, layout=pipeline, vp_stage=c), layout=pipeline)
              for c in range(pipeline.dims.num_model_chunks)]
    for chunk in chunks:
        chunk.zero_grad_buffer()
    iterators = [iter(batches) for _ in chunks] if virtual_pp else iter(batches)
    get_forward_backward_func(pipeline)(forward_step_func=forward_step, data_iterator=iterators, model=chunks,
                                        num_microbatches=num_microbatches, seq_length=SEQ,
                                        micro_batch_size=MICRO_BATCH, layout=pipeline)
    for chunk in chunks:
        chunk.finish_grad_sync()
    got = {name: p.main_grad.clone() for chunk in chunks for name, p in chunk.module.named_parameters()}

    reference = GPTModel(config, seed=3, layout=single)
    for batch in batches:
        output, loss_func = forward_step(iter([batch]), reference)
        (loss_func(output)[0] / num_microbatches).backward()
    expected = {name: p.grad for name, p in reference.named_parameters()}
    counts = (count_parameters([chunk.module for chunk in chunks], pipeline), count_parameters([reference], single))
    return {name: (grad, expected[name]) for name, grad in got.items()}, counts


@pytest.mark.parametrize("virtual_pp,untied,num_microbatches", [(None, False, 4), (None, True, 3), (2, False, 4)])
def test_every_gradient_at_pp2_equals_pp1(virtual_pp, untied, num_microbatches):
    per_rank = run_distributed(_pipeline_grads, 2, args=(virtual_pp, untied, num_microbatches))
    names = set()
    for pairs, (pipeline_count, single_count) in per_rank:
        assert pipeline_count == single_count  # the tied copy is not counted twice
        for name, (got, expected) in pairs.items():
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=name)
        names |= set(pairs)
    reference_names = {"embedding.word_embeddings.weight", "decoder.layers.0.mlp.linear_fc1.weight",
                       "decoder.layers.3.self_attention.linear_qkv.weight", "decoder.final_layernorm.weight"}
    assert reference_names <= names  # both stages' parameters were compared
    assert ("output_layer.weight" in names) == untied


def _count_in_flight(num_microbatches):
    """The most micro-batches whose forward ran and whose backward has not, on this stage, under 1F1B."""
    layout = parallel_state.initialize_model_parallel(pipeline_model_parallel_size=4)
    model = DistributedDataParallel(GPTModel(_config(), seed=3))
    model.zero_grad_buffer()
    state = {"in_flight": 0, "peak": 0}

    def backward_done(_grad):
        state["in_flight"] -= 1

    def counting_forward_step(data_iterator, chunk):
        output, loss_func = forward_step(data_iterator, chunk)
        state["in_flight"] += 1
        state["peak"] = max(state["peak"], state["in_flight"])
        output.register_hook(backward_done)  # runs when this micro-batch's backward reaches the stage's output
        return output, loss_func

    get_forward_backward_func()(forward_step_func=counting_forward_step, data_iterator=iter(_batches(num_microbatches, 1)),
                                model=[model], num_microbatches=num_microbatches, seq_length=SEQ,
                                micro_batch_size=MICRO_BATCH)
    return layout.pp_rank, state["peak"], state["in_flight"]


def test_1f1b_holds_at_most_pp_microbatches_per_stage():
    results = run_distributed(_count_in_flight, 4, args=(8,))
    for pp_rank, peak, left in results:
        assert left == 0
        assert peak == 4 - pp_rank  # stage 0 holds p = 4 of the m = 8 micro-batches at most, never all 8


def _side_by_side():
    tp2, tp1 = ParallelLayout.build(tp=2), ParallelLayout.build(tp=1)
    config = _config()
    tokens = _batches(1, seed=5)[0]["tokens"]
    split, whole = GPTModel(config, seed=11, layout=tp2), GPTModel(config, seed=11, layout=tp1)
    with torch.no_grad():
        logits_tp2 = gather_from_tensor_model_parallel_region(split(tokens), tp2.tp_group)[..., :VOCAB]
        logits_tp1 = whole(tokens)[..., :VOCAB]
    assert not parallel_state.model_parallel_is_initialized()  # neither model needed a current layout
    return logits_tp2, logits_tp1, split.layout.tp, whole.layout.tp


def test_a_tp2_and_a_tp1_model_live_side_by_side():
    for logits_tp2, logits_tp1, tp_a, tp_b in run_distributed(_side_by_side, 2):
        assert (tp_a, tp_b) == (2, 1)
        torch.testing.assert_close(logits_tp2, logits_tp1, rtol=1e-5, atol=1e-5)
