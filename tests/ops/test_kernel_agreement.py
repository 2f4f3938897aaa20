"""Every rank of a job takes the same op path: initialize_kernels() agrees over the world.

The ranks are CPU processes that pretend to have a GPU; the build is replaced by a stand-in that
succeeds (returns a module object) or fails on chosen ranks, so the agreement itself runs for real
over gloo. A rank on the PyTorch path beside ranks on the kernel path would draw other dropout
masks for replicated activations; the job must instead use PyTorch everywhere, and say why.
"""

import warnings
from unittest import mock

import pytest
import torch

from megatronish.ops import extension
from megatronish.testing import run_distributed


class _CudaTensor:
    is_cuda = True


def _fresh_state():
    return mock.patch.multiple(extension, _build_tried=False, _module=None, _failure=None, _failure_detail=None,
                               _enabled=True, _agreed=False)


def _build_failing_on(failing_ranks):
    def build():
        if torch.distributed.get_rank() in failing_ranks:
            raise RuntimeError("Error building extension 'megatronish_kernels': softmax.cu(3): error: expected a ';'")
        return object()  # stands in for the loaded extension module

    return build


def _agree(failing_ranks):
    with _fresh_state(), mock.patch.object(torch.cuda, "is_available", lambda: True), \
            mock.patch.object(extension, "_build", _build_failing_on(failing_ranks)), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = extension.initialize_kernels()
        return dict(path=path, uses_kernels=extension.cuda_module_for(_CudaTensor()) is not None,
                    warnings=[str(w.message) for w in caught])


def test_a_build_failing_on_one_rank_switches_the_kernels_off_on_every_rank():
    results = run_distributed(_agree, world_size=3, args=({1},))
    for rank, result in enumerate(results):
        assert not result["uses_kernels"], f"rank {rank} would use the kernels while rank 1 cannot"
        assert result["path"].startswith("PyTorch paths")
        assert len(result["warnings"]) == 1
        assert "unusable on 1 of 3 ranks (rank 1: RuntimeError" in result["warnings"][0]
        assert "expected a ';'" in result["warnings"][0]


def test_ranks_that_all_build_all_use_the_kernels_silently():
    for result in run_distributed(_agree, world_size=2, args=(set(),)):
        assert result["uses_kernels"] and result["path"] == "fused CUDA kernels (kernels/)"
        assert result["warnings"] == []


def _first_op_without_agreement():
    with _fresh_state(), mock.patch.object(extension, "_build", _build_failing_on({1})):
        try:
            return extension.cuda_module_for(_CudaTensor()) is not None
        except RuntimeError as error:
            return str(error)


def test_a_job_that_skipped_the_agreement_stops_instead_of_falling_back_on_one_rank():
    uses_kernels, error = run_distributed(_first_op_without_agreement, world_size=2)
    assert uses_kernels is True
    assert "failed to build on rank 1" in error and "initialize_kernels()" in error


def test_one_process_still_falls_back_with_a_warning():
    with _fresh_state(), mock.patch.object(extension, "_build", lambda: 1 / 0), \
            pytest.warns(RuntimeWarning, match="ZeroDivisionError"):
        assert extension.cuda_module_for(_CudaTensor()) is None
