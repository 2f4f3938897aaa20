"""Forward and backward over the micro-batches of one iteration, with or without pipelining.

`get_forward_backward_func(layout)` returns one of three functions with one signature, so the
training loop calls the same thing at every layout:

    losses = forward_backward(forward_step_func=..., data_iterator=..., model=[chunk, ...],
                              num_microbatches=m, seq_length=s, micro_batch_size=b,
                              forward_only=False, grad_scale_func=None)

  - forward_backward_no_pipelining: PP = 1; the micro-batches one after the other.
  - forward_backward_pipelining_without_interleaving (1F1B): stage r runs p - r - 1 warm-up
    forwards, then alternates one forward and one backward, then drains the backwards; a stage
    never holds more than p micro-batches' activations.
  - forward_backward_pipelining_with_interleaving: each stage holds v model chunks (virtual
    stages), which cuts the bubble from (p-1)/(m+p-1) to (p-1)/(v m + p-1) of the step.

As in Megatron, `forward_step_func(data_iterator, model_chunk)` returns `(output, loss_func)`, and
on the last stage `loss_func(output)` returns `(loss, reported)`: the micro-batch's mean loss (a
scalar tensor) and a dict of what to report. Backward runs on `loss / num_microbatches`, times
`grad_scale_func(loss)` if given (the fp16 loss scale). The function returns the list of
`reported` dicts (last stage; empty elsewhere). Gradients accumulate over the micro-batches;
only the backward of each chunk's last micro-batch runs outside the chunk's `no_sync()`, so a
DDP wrapper may start reducing its buckets then. With interleaving, `data_iterator` is a list
with one iterator per chunk (each chunk reads every micro-batch once, in order).
"""

import contextlib

import torch

from megatronish import parallel_state
from megatronish.parallel_layout import ParallelLayout
from megatronish.pipeline_parallel.p2p_communication import P2PCommunicator


def get_forward_backward_func(layout: ParallelLayout | None = None):
    """The schedule for `layout` (default: the current one)."""
    layout = layout or parallel_state.get_layout()
    if layout.pp == 1:
        return forward_backward_no_pipelining
    if layout.dims.virtual_pp:
        return forward_backward_pipelining_with_interleaving
    return forward_backward_pipelining_without_interleaving


# ---------------------------------------------------------------------------------- shared steps

class _Steps:
    """Forward and backward of one micro-batch on one model chunk; the loss bookkeeping."""

    def __init__(self, forward_step_func, data_iterators, model, num_microbatches, forward_only, grad_scale_func):
        self.forward_step_func, self.data_iterators, self.model = forward_step_func, data_iterators, model
        self.num_microbatches, self.forward_only, self.grad_scale_func = num_microbatches, forward_only, grad_scale_func
        self.reported = []
        self.backwards_done = [0] * len(model)

    def forward(self, chunk: int, input_tensor, is_last_stage: bool):
        """Run the chunk on the next micro-batch; on the last stage return the scaled loss to backpropagate."""
        module = self.model[chunk]
        module.set_input_tensor(input_tensor)
        with torch.no_grad() if self.forward_only else contextlib.nullcontext():
            output, loss_func = self.forward_step_func(self.data_iterators[chunk], module)
            if not is_last_stage:
                return output
            loss, reported = loss_func(output)
        self.reported.append(reported)
        if self.forward_only:
            return loss
        loss = loss / self.num_microbatches
        return loss * self.grad_scale_func(loss) if self.grad_scale_func is not None else loss

    def backward(self, chunk: int, input_tensor, output, output_grad):
        """Backpropagate one micro-batch through the chunk; returns the gradient of its input (or None)."""
        self.backwards_done[chunk] += 1
        last_microbatch = self.backwards_done[chunk] == self.num_microbatches
        module = self.model[chunk]
        no_sync = getattr(module, "no_sync", None)
        with no_sync() if no_sync is not None and not last_microbatch else contextlib.nullcontext():
            torch.autograd.backward(output, grad_tensors=output_grad)
        return input_tensor.grad if input_tensor is not None else None


def _set_virtual_rank(chunk: int) -> None:
    """Megatron-core's view (parallel_state.is_pipeline_first_stage() etc.) follows the chunk that runs."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.set_virtual_pipeline_model_parallel_rank(chunk)


def _data_iterators(data_iterator, num_chunks: int) -> list:
    if num_chunks == 1:
        return data_iterator if isinstance(data_iterator, list) else [data_iterator]
    if not isinstance(data_iterator, list) or len(data_iterator) != num_chunks:
        raise ValueError(f"an interleaved pipeline needs one data iterator per model chunk ({num_chunks}), "
                         f"got {type(data_iterator).__name__}")
    return data_iterator


def _check_model(model, layout: ParallelLayout) -> list:
    model = model if isinstance(model, list) else [model]
    if len(model) != layout.dims.num_model_chunks:
        raise ValueError(f"the layout {layout.describe()} needs {layout.dims.num_model_chunks} model chunk(s) per "
                         f"rank, got {len(model)}")
    return model


def _tensor_shape(layout: ParallelLayout, config, seq_length: int, micro_batch_size: int) -> tuple:
    length = seq_length // layout.tp if config.sequence_parallel else seq_length
    return length, micro_batch_size, config.hidden_size


def _communicator(model, layout, seq_length, micro_batch_size) -> P2PCommunicator:
    config = getattr(model[0], "module", model[0]).config  # a DDP wrapper holds the GPTModel as .module
    device = next(model[0].parameters()).device
    return P2PCommunicator(layout, _tensor_shape(layout, config, seq_length, micro_batch_size),
                           config.params_dtype, device)


# ------------------------------------------------------------------------------------ schedules

def forward_backward_no_pipelining(*, forward_step_func, data_iterator, model, num_microbatches: int,
                                   seq_length: int | None = None, micro_batch_size: int | None = None,
                                   forward_only: bool = False, grad_scale_func=None, layout=None) -> list:
    """One chunk, no pipeline: forward and backward each micro-batch in turn."""
    model = model if isinstance(model, list) else [model]
    steps = _Steps(forward_step_func, _data_iterators(data_iterator, 1), model, num_microbatches, forward_only,
                   grad_scale_func)
    for _ in range(num_microbatches):
        loss = steps.forward(0, None, is_last_stage=True)
        if not forward_only:
            steps.backward(0, None, loss, None)
    return steps.reported


def num_warmup_microbatches(p: int, r: int, m: int, v: int = 1, forward_only: bool = False) -> int:
    """Forwards stage r runs before its first backward (counting each of the v chunks' micro-batches):
    1F1B p - r - 1; interleaved 2 (p - r - 1) + (v - 1) p, or all m v when m = p; never more than there are."""
    total = m * v
    if forward_only or (v > 1 and m == p):
        return total
    if v == 1:
        return min(p - r - 1, m)
    return min(2 * (p - r - 1) + (v - 1) * p, total)


def model_chunk_id(k: int, p: int, v: int, forward: bool = True) -> int:
    """The model chunk of stage-local virtual micro-batch k: forwards go through the chunks in groups of
    p micro-batches, backwards in the reverse chunk order."""
    chunk = (k % (p * v)) // p
    return chunk if forward else v - 1 - chunk


def forward_backward_pipelining_without_interleaving(*, forward_step_func, data_iterator, model,
                                                     num_microbatches: int, seq_length: int, micro_batch_size: int,
                                                     forward_only: bool = False, grad_scale_func=None,
                                                     layout: ParallelLayout | None = None) -> list:
    """1F1B over the stages of `layout`: warm-up forwards, then one forward + one backward, then the backwards."""
    layout = layout or parallel_state.get_layout()
    model = _check_model(model, layout)
    p2p = _communicator(model, layout, seq_length, micro_batch_size)
    steps = _Steps(forward_step_func, _data_iterators(data_iterator, 1), model, num_microbatches, forward_only,
                   grad_scale_func)
    first, last = layout.is_first_stage, layout.is_last_stage
    warmup = num_warmup_microbatches(layout.pp, layout.pp_rank, num_microbatches, 1, forward_only)
    remaining = num_microbatches - warmup
    inputs, outputs = [], []  # micro-batches in flight on this stage: forward done, backward not yet

    def forward(input_tensor):
        output = steps.forward(0, input_tensor, last)
        if not forward_only:
            inputs.append(input_tensor)
            outputs.append(output)
        return output

    def backward(output_grad):
        return steps.backward(0, inputs.pop(0), outputs.pop(0), output_grad)

    for _ in range(warmup):
        output = forward(None if first else p2p.recv_forward())
        if not last:
            p2p.send_forward(output)
    input_tensor = None if first or remaining == 0 else p2p.recv_forward()
    for i in range(remaining):  # none when forward_only: everything was warm-up
        output = forward(input_tensor)
        output_grad = None if last else p2p.send_forward_recv_backward(output)
        input_grad = backward(output_grad)
        if i == remaining - 1:
            input_tensor = None
            if not first:
                p2p.send_backward(input_grad)
        else:
            input_tensor = None if first else p2p.send_backward_recv_forward(input_grad)
    if not forward_only:
        for _ in range(warmup):
            input_grad = backward(None if last else p2p.recv_backward())
            if not first:
                p2p.send_backward(input_grad)
    return steps.reported


def forward_backward_pipelining_with_interleaving(*, forward_step_func, data_iterator, model,
                                                  num_microbatches: int, seq_length: int, micro_batch_size: int,
                                                  forward_only: bool = False, grad_scale_func=None,
                                                  layout: ParallelLayout | None = None) -> list:
    """Interleaved 1F1B: v chunks per stage, micro-batches in groups of p (m must be a multiple of p).

    Virtual micro-batch k (0 <= k < m v) runs, forward, on chunk (k mod p v) div p with micro-batch
    (k div p v) p + k mod p; backward visits the chunks in reverse. Stage r warms up with
    2 (p - r - 1) + (v - 1) p forwards (all of them when m = p), then alternates, then drains.
    """
    layout = layout or parallel_state.get_layout()
    model = _check_model(model, layout)
    p, r, v, m = layout.pp, layout.pp_rank, len(model), num_microbatches
    if m % p != 0:
        raise ValueError(f"the interleaved pipeline schedule needs the number of micro-batches ({m}) to be a "
                         f"multiple of the pipeline size ({p}): change --global-batch-size or --micro-batch-size")
    p2p = _communicator(model, layout, seq_length, micro_batch_size)
    steps = _Steps(forward_step_func, _data_iterators(data_iterator, v), model, m, forward_only, grad_scale_func)
    first_stage, last_stage = layout.is_first_stage, layout.is_last_stage
    total = m * v
    all_warmup = forward_only or m == p
    warmup = num_warmup_microbatches(p, r, m, v, forward_only)
    remaining = total - warmup

    def chunk_of(k: int, forward: bool) -> int:
        return model_chunk_id(k, p, v, forward)

    inputs = [[] for _ in range(v)]         # per chunk: inputs of micro-batches in flight (None on the first virtual stage)
    outputs = [[] for _ in range(v)]        # their outputs (the scaled loss on the last virtual stage)
    output_grads = [[] for _ in range(v)]   # gradients received for those outputs

    def is_first_virtual(chunk):
        return first_stage and chunk == 0

    def is_last_virtual(chunk):
        return last_stage and chunk == v - 1

    def forward(k: int):
        chunk = chunk_of(k, True)
        _set_virtual_rank(chunk)
        if is_first_virtual(chunk):
            inputs[chunk].append(None)
        output = steps.forward(chunk, inputs[chunk][-1], is_last_virtual(chunk))
        outputs[chunk].append(output)
        if forward_only:  # nothing to keep for backward
            inputs[chunk].pop()
            outputs[chunk].pop()
        return output

    def backward(k: int):
        chunk = chunk_of(k, False)
        _set_virtual_rank(chunk)
        if is_last_virtual(chunk):
            output_grads[chunk].append(None)
        return steps.backward(chunk, inputs[chunk].pop(0), outputs[chunk].pop(0), output_grads[chunk].pop(0))

    # Received activations wait in their chunk's list for the forward that uses them.
    if not first_stage:
        inputs[0].append(p2p.recv_forward())
    for k in range(warmup):
        chunk = chunk_of(k, True)
        output = forward(k)
        next_chunk = chunk_of(k + 1, True)
        recv_prev = not (first_stage and next_chunk == 0) and k != total - 1
        send = None if is_last_virtual(chunk) else output
        if k == warmup - 1 and not all_warmup:  # the steady phase starts with a backward: get its gradient too
            from_prev, from_next = p2p.communicate(send_next=send, recv_prev=recv_prev, recv_next=not last_stage)
            if from_next is not None:
                output_grads[v - 1].append(from_next)
        else:
            from_prev, _ = p2p.communicate(send_next=send, recv_prev=recv_prev)
        if recv_prev:
            inputs[next_chunk].append(from_prev)

    for i in range(remaining):
        forward_k, backward_k = warmup + i, i
        forward_chunk, backward_chunk = chunk_of(forward_k, True), chunk_of(backward_k, False)
        output = forward(forward_k)
        input_grad = backward(backward_k)
        # What arrives now is for the neighbours' schedule position: the first stage runs p - 1 virtual
        # micro-batches ahead of the last one (and the last behind the first), hence the offsets.
        if first_stage:
            from_last_chunk = chunk_of(forward_k - (p - 1), True)
            recv_prev, next_forward_chunk = from_last_chunk != v - 1, from_last_chunk + 1
        else:
            recv_prev, next_forward_chunk = True, chunk_of(forward_k + 1, True)
        if last_stage:
            from_first_chunk = chunk_of(backward_k - (p - 1), False)
            recv_next, next_backward_chunk = from_first_chunk != 0, from_first_chunk - 1
        else:
            recv_next, next_backward_chunk = True, chunk_of(backward_k + 1, False)
        recv_prev = recv_prev and i != remaining - 1
        from_prev, from_next = p2p.communicate(
            send_next=None if is_last_virtual(forward_chunk) else output,
            send_prev=None if is_first_virtual(backward_chunk) else input_grad,
            recv_prev=recv_prev, recv_next=recv_next)
        if recv_prev:
            inputs[next_forward_chunk].append(from_prev)
        if recv_next:
            output_grads[next_backward_chunk].append(from_next)

    if forward_only:
        _set_virtual_rank(0)
        return steps.reported
    if all_warmup and not last_stage:
        output_grads[v - 1].append(p2p.recv_backward())
    for k in range(remaining, total):
        chunk = chunk_of(k, False)
        input_grad = backward(k)
        next_chunk = chunk_of(k + 1, False)
        recv_next = not (last_stage and next_chunk == v - 1) and k != total - 1
        _, from_next = p2p.communicate(send_prev=None if is_first_virtual(chunk) else input_grad,
                                       recv_next=recv_next)
        if recv_next:
            output_grads[next_chunk].append(from_next)
    _set_virtual_rank(0)
    return steps.reported
