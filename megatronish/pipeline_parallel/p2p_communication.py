"""Point-to-point transfers of activations and their gradients between neighbouring pipeline stages.

Every transfer has the shape the model config implies ([s, b, h], or [s/tp, b, h] under sequence
parallelism), so no shape is exchanged per step. The sends and receives of one call are posted
together with `batch_isend_irecv` and then awaited, so that two neighbours calling, say,
`send_forward_recv_backward` and `send_backward_recv_forward` at the same time cannot block each
other. Neighbours wrap around (the last stage's next is the first): interleaved schedules pass
a micro-batch from the last stage's chunk c to the first stage's chunk c + 1.

Between two ranks, forward messages (activations) and backward messages (gradients) go in
separate tagged streams, posted in the same order on both sides: with two stages the previous
and the next stage are the same rank, and both kinds of message may travel in one call.
"""

import torch
import torch.distributed as dist

from megatronish.parallel_layout import ParallelLayout

_FORWARD_TAG, _BACKWARD_TAG = 0, 1


class P2PCommunicator:
    """Sends and receives [tensor_shape] tensors of `dtype` between this rank's neighbouring stages."""

    def __init__(self, layout: ParallelLayout, tensor_shape: tuple, dtype: torch.dtype, device: torch.device):
        self.layout, self.tensor_shape, self.dtype, self.device = layout, tuple(tensor_shape), dtype, device

    def _empty(self) -> torch.Tensor:
        # Received activations are leaves of this stage's graph: backward computes their gradient to send back.
        return torch.empty(self.tensor_shape, dtype=self.dtype, device=self.device, requires_grad=True)

    def communicate(self, send_next: torch.Tensor | None = None, send_prev: torch.Tensor | None = None,
                    recv_prev: bool = False, recv_next: bool = False):
        """Post the given sends and receives at once, wait for all; returns (from_prev, from_next) or None each."""
        from_prev = self._empty() if recv_prev else None
        from_next = self._empty() if recv_next else None
        ops = []
        group, next_rank, prev_rank = self.layout.pp_group, self.layout.next_stage_rank, self.layout.prev_stage_rank
        # Sends first, forward before backward; receives likewise: the order is the same on both ends of a pair.
        if send_next is not None:
            ops.append(dist.P2POp(dist.isend, _contiguous(send_next), next_rank, group, _FORWARD_TAG))
        if send_prev is not None:
            ops.append(dist.P2POp(dist.isend, _contiguous(send_prev), prev_rank, group, _BACKWARD_TAG))
        if from_prev is not None:
            ops.append(dist.P2POp(dist.irecv, from_prev, prev_rank, group, _FORWARD_TAG))
        if from_next is not None:
            ops.append(dist.P2POp(dist.irecv, from_next, next_rank, group, _BACKWARD_TAG))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        return from_prev, from_next

    # Megatron's names for the combinations the schedules use.
    def recv_forward(self):
        return self.communicate(recv_prev=True)[0]

    def recv_backward(self):
        return self.communicate(recv_next=True)[1]

    def send_forward(self, output: torch.Tensor) -> None:
        self.communicate(send_next=output)

    def send_backward(self, input_grad: torch.Tensor) -> None:
        self.communicate(send_prev=input_grad)

    def send_forward_recv_backward(self, output: torch.Tensor):
        return self.communicate(send_next=output, recv_next=True)[1]

    def send_backward_recv_forward(self, input_grad: torch.Tensor):
        return self.communicate(send_prev=input_grad, recv_prev=True)[0]


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous()
