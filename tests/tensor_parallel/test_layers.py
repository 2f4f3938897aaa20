"""Parallel layers against dense torch.nn references holding the same full weights.

The full weights, inputs and upstream gradients are drawn from one seed on every rank (so
all ranks agree on them); each rank loads its slice, runs forward and backward, and
compares its output and gradients with the dense layer's, in float64 (tolerance 1e-10:
the only difference is the order of additions).
"""

import pytest
import torch
import torch.nn.functional as F

import megatronish.tensor_parallel as tp
from megatronish import parallel_state as ps
from megatronish.testing import RankFailed, run_distributed

TOL = dict(rtol=1e-10, atol=1e-10)
S, B, IN, OUT = 8, 2, 16, 32  # sequence, batch, input and output widths: divisible by 1, 2, 4, 8 (x2 for stride)


def _draw(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _load_full(layer, weight, bias):
    with torch.no_grad():
        layer.weight.copy_(tp.shard_of_full(weight, layer.weight))
        if bias is not None:
            layer.bias.copy_(tp.shard_of_full(bias, layer.bias))


def _dense(x, weight, bias, grad_out):
    x = x.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    y = F.linear(x, w, b)
    y.backward(grad_out)
    return y.detach(), x.grad, w.grad, b.grad


def _seq_chunk(t):
    return t.chunk(ps.get_tensor_model_parallel_world_size(), dim=0)[ps.get_tensor_model_parallel_rank()]


def _col_chunk(t):
    return t.chunk(ps.get_tensor_model_parallel_world_size(), dim=-1)[ps.get_tensor_model_parallel_rank()]


def _check_column(gather_output, sequence_parallel, skip_bias_add, stride):
    weight, bias = _draw(1, OUT, IN), _draw(2, OUT)
    x, grad_out = _draw(3, S, B, IN), _draw(4, S, B, OUT)
    ref_y, ref_dx, ref_dw, ref_db = _dense(x, weight, bias, grad_out)

    layer = tp.ColumnParallelLinear(IN, OUT, gather_output=gather_output, sequence_parallel=sequence_parallel,
                                    skip_bias_add=skip_bias_add, params_dtype=torch.float64, stride=stride)
    _load_full(layer, weight, bias)
    local_x = (_seq_chunk(x) if sequence_parallel else x).clone().requires_grad_(True)
    y, returned_bias = layer(local_x)
    if skip_bias_add:
        assert returned_bias.shape == (OUT if gather_output else OUT // ps.get_tensor_model_parallel_world_size(),)
        y = y + returned_bias
    else:
        assert returned_bias is None
    # The un-gathered output holds this rank's output features, in the order the shard does.
    local_ref = lambda t: t if gather_output else tp.shard_of_full(t.movedim(-1, 0), layer.weight).movedim(0, -1)
    torch.testing.assert_close(y, local_ref(ref_y), **TOL)
    y.backward(local_ref(grad_out))
    torch.testing.assert_close(local_x.grad, _seq_chunk(ref_dx) if sequence_parallel else ref_dx, **TOL)
    torch.testing.assert_close(layer.weight.grad, tp.shard_of_full(ref_dw, layer.weight), **TOL)
    torch.testing.assert_close(layer.bias.grad, tp.shard_of_full(ref_db, layer.bias), **TOL)
    torch.testing.assert_close(tp.gather_full(layer.weight.grad, like=layer.weight), ref_dw, **TOL)


def _check_row(input_is_parallel, sequence_parallel, skip_bias_add):
    weight, bias = _draw(5, OUT, IN), _draw(6, OUT)
    x, grad_out = _draw(7, S, B, IN), _draw(8, S, B, OUT)
    ref_y, ref_dx, ref_dw, ref_db = _dense(x, weight, bias, grad_out)

    layer = tp.RowParallelLinear(IN, OUT, input_is_parallel=input_is_parallel, sequence_parallel=sequence_parallel,
                                 skip_bias_add=skip_bias_add, params_dtype=torch.float64)
    _load_full(layer, weight, bias)
    local_x = (_col_chunk(x) if input_is_parallel else x).clone().requires_grad_(True)
    y, returned_bias = layer(local_x)
    if skip_bias_add:
        y = y + returned_bias
    expected_y, expected_grad = (_seq_chunk(ref_y), _seq_chunk(grad_out)) if sequence_parallel else (ref_y, grad_out)
    torch.testing.assert_close(y, expected_y, **TOL)
    y.backward(expected_grad)
    torch.testing.assert_close(local_x.grad, _col_chunk(ref_dx) if input_is_parallel else ref_dx, **TOL)
    torch.testing.assert_close(layer.weight.grad, tp.shard_of_full(ref_dw, layer.weight), **TOL)
    bias_grad = layer.bias.grad
    if sequence_parallel:  # each rank saw its sequence shard only: the partial sums add up to the full grad
        assert layer.bias.sequence_parallel
        bias_grad = tp.reduce_from_tensor_model_parallel_region(bias_grad)
    torch.testing.assert_close(bias_grad, ref_db, **TOL)


def _check_embedding(reduce_scatter_embeddings):
    vocab, unpadded, dim = 32, 27, 8
    weight = _draw(9, vocab, dim)
    ids = torch.randint(0, unpadded, (B, S), generator=torch.Generator().manual_seed(10))
    grad_out = _draw(11, B, S, dim)
    w_ref = weight.clone().requires_grad_(True)
    ref_y = F.embedding(ids, w_ref)
    ref_y.backward(grad_out)

    layer = tp.VocabParallelEmbedding(vocab, dim, params_dtype=torch.float64,
                                      reduce_scatter_embeddings=reduce_scatter_embeddings)
    with torch.no_grad():
        layer.weight.copy_(tp.shard_of_full(weight, layer.weight))
    y = layer(ids)
    if reduce_scatter_embeddings:  # sequence-first shard [s/tp, b, h]
        expected_y, expected_grad = _seq_chunk(ref_y.transpose(0, 1)), _seq_chunk(grad_out.transpose(0, 1))
    else:
        expected_y, expected_grad = ref_y, grad_out
    torch.testing.assert_close(y, expected_y, **TOL)
    y.backward(expected_grad)
    torch.testing.assert_close(tp.gather_full(layer.weight.grad, like=layer.weight), w_ref.grad, **TOL)


def _check_all_layers(tp_size):
    ps.initialize_model_parallel(tp_size)
    for gather_output in (False, True):
        for skip_bias_add in (False, True):
            for stride in (1, 2) if not gather_output else (1,):
                _check_column(gather_output, False, skip_bias_add, stride)
    _check_column(False, True, False, 1)
    for input_is_parallel in (False, True):
        for skip_bias_add in (False, True):
            _check_row(input_is_parallel, False, skip_bias_add)
    _check_row(True, True, False)
    _check_row(True, True, True)
    _check_embedding(False)
    _check_embedding(True)
    return True


@pytest.mark.parametrize("tp_size", [1, 2, 4, 8])
def test_layers_match_dense_reference(tp_size):
    assert all(run_distributed(_check_all_layers, tp_size, args=(tp_size,)))


def _sequence_parallel_equals_plain(tp_size):
    """A column -> row block with sequence parallelism equals the same block without it."""
    ps.initialize_model_parallel(tp_size)
    x, grad_out = _draw(12, S, B, IN), _draw(13, S, B, IN)
    outputs = []
    for sp in (False, True):
        torch.manual_seed(0)
        col = tp.ColumnParallelLinear(IN, OUT, sequence_parallel=sp, params_dtype=torch.float64)
        row = tp.RowParallelLinear(OUT, IN, input_is_parallel=True, sequence_parallel=sp, params_dtype=torch.float64)
        local_x = (_seq_chunk(x) if sp else x).clone().requires_grad_(True)
        y, _ = row(torch.nn.functional.gelu(col(local_x)[0]))
        y.backward(_seq_chunk(grad_out) if sp else grad_out)
        full_y = tp.gather_from_sequence_parallel_region(y.detach()) if sp else y.detach()
        full_dx = tp.gather_from_sequence_parallel_region(local_x.grad) if sp else local_x.grad
        row_bias_grad = tp.reduce_from_tensor_model_parallel_region(row.bias.grad) if sp else row.bias.grad
        outputs.append((full_y, full_dx, col.weight.grad, col.bias.grad, row.weight.grad, row_bias_grad))
    for plain, seq in zip(*outputs):
        torch.testing.assert_close(seq, plain, **TOL)
    return True


@pytest.mark.parametrize("tp_size", [2, 4])
def test_sequence_parallel_block_equals_plain_block(tp_size):
    assert all(run_distributed(_sequence_parallel_equals_plain, tp_size, args=(tp_size,)))


def _initial_full_weights(tp_size):
    ps.initialize_model_parallel(tp_size)
    torch.manual_seed(1234)
    layers = [
        tp.ColumnParallelLinear(IN, OUT),
        tp.ColumnParallelLinear(IN, 2 * OUT, stride=2),
        tp.RowParallelLinear(OUT, IN),
        tp.VocabParallelEmbedding(16 * tp_size, IN, unpadded_num_embeddings=13),
    ]
    return [tp.gather_full(layer.weight) for layer in layers]


@pytest.mark.parametrize("tp_size", [2, 4, 8])
def test_initial_weights_are_the_tp1_weights_sliced(tp_size):
    reference = run_distributed(_initial_full_weights, 1, args=(1,))[0]
    for rank_weights in run_distributed(_initial_full_weights, tp_size, args=(tp_size,)):
        for ref, got in zip(reference, rank_weights):
            rows = min(ref.size(0), got.size(0))  # the embedding's padding grows with TP
            torch.testing.assert_close(got[:rows], ref[:rows], rtol=0, atol=0)
        assert rank_weights[-1][13:].abs().sum() == 0  # the embedding's padding rows are zero at every TP size
    assert reference[-1][:13].abs().sum() > 0


def _build(kind, tp_size):
    ps.initialize_model_parallel(tp_size)
    if kind == "column":
        tp.ColumnParallelLinear(IN, 10)
    elif kind == "row":
        tp.RowParallelLinear(10, OUT)
    elif kind == "vocab":
        tp.VocabParallelEmbedding(50, 8)


@pytest.mark.parametrize("kind,message", [
    ("column", r"ColumnParallelLinear output_size 10 is not divisible by the tensor-model-parallel size 4"),
    ("row", r"RowParallelLinear input_size 10 is not divisible by the tensor-model-parallel size 4"),
    ("vocab", r"num_embeddings \(padded vocabulary size\) 50 is not divisible by the tensor-model-parallel size 4"),
])
def test_sizes_not_divisible_by_tp_are_named(kind, message):
    with pytest.raises(RankFailed, match=message):
        run_distributed(_build, 4, args=(kind, 4))


def test_layer_built_before_initialize_model_parallel_says_what_to_call():
    with pytest.raises(RuntimeError, match=r"model parallel is not initialized: call .*initialize_model_parallel"):
        tp.ColumnParallelLinear(IN, OUT)
