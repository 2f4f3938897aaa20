"""Pipeline parallelism: point-to-point transfers between stages and the forward-backward schedules."""

from megatronish.pipeline_parallel.p2p_communication import P2PCommunicator
from megatronish.pipeline_parallel.schedules import (
    forward_backward_no_pipelining,
    forward_backward_pipelining_with_interleaving,
    forward_backward_pipelining_without_interleaving,
    get_forward_backward_func,
)

__all__ = [name for name in dir() if not name.startswith("_")]
