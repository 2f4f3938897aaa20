"""A user's own two-layer MLP split across ranks, checked against the same model in one process.

    torchrun --nproc_per_node 4 examples/tp_mlp.py

Each rank holds a quarter of the hidden layer: the first linear is column-parallel (each
rank computes a slice of the hidden units), the second row-parallel (each rank multiplies
its slice; an all-reduce sums them). The full weights are drawn from one seed, so the
dense model below holds exactly the same numbers.
"""

import torch
import torch.nn.functional as F
from torch import nn

from megatronish import parallel_state
from megatronish.tensor_parallel import ColumnParallelLinear, RowParallelLinear, gather_full


class ParallelMLP(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.up = ColumnParallelLinear(width, hidden)  # weight [hidden / tp, width]
        self.down = RowParallelLinear(hidden, width, input_is_parallel=True)  # weight [width, hidden / tp]

    def forward(self, x):
        h, _ = self.up(x)  # [batch, hidden / tp]: this rank's hidden units
        y, _ = self.down(F.gelu(h))  # all-reduced: the full output on every rank
        return y


def main():
    parallel_state.initialize_distributed()  # NCCL + GPU if there is one, else gloo + CPU
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=torch.distributed.get_world_size())
    torch.manual_seed(0)  # the same full weights on every rank (and at any TP size)
    model = ParallelMLP(width=64, hidden=256)
    x = torch.randn(8, 64, device=parallel_state.get_device())
    y = model(x)
    y.square().sum().backward()

    # The dense single-process model with the full weights, gathered from the ranks.
    dense = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).to(x.device)
    with torch.no_grad():
        for dense_layer, layer in ((dense[0], model.up), (dense[2], model.down)):
            dense_layer.weight.copy_(gather_full(layer.weight))
            dense_layer.bias.copy_(gather_full(layer.bias))
    y_dense = dense(x)
    y_dense.square().sum().backward()

    out_diff = (y - y_dense).abs().max().item()
    grad_diff = (gather_full(model.up.weight.grad, like=model.up.weight) - dense[0].weight.grad).abs().max().item()
    if torch.distributed.get_rank() == 0:
        tp = parallel_state.get_tensor_model_parallel_world_size()
        print(f"TP={tp}: max |output - dense| = {out_diff:.3e}, max |grad W1 - dense| = {grad_diff:.3e}")
    assert out_diff < 1e-5 and grad_diff < 1e-4, "the parallel model does not match the dense one"
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
