"""The machines a layout is planned for: accelerator presets, a cluster description, the speed constants.

    cluster = Cluster(PRESETS["H100"], nodes=2, devices_per_node=8, price_per_device_hour=2.5)
    cluster = load_cluster("my_cluster.json")        # the same fields as JSON (see Cluster.from_dict)

An Accelerator holds datasheet numbers; SpeedConstants holds what a training step achieves on it
(the planner's time model, megatronish/planner/speed.py). Before calibration the constants are
fractions of the datasheet (stated below); `tools/plan.py --profile` measures them on this machine
and writes them into the goodput profile (megatronish/planner/calibration.py), which replaces them.
"""

import dataclasses
import json
import os
from dataclasses import dataclass, field

GB = 10**9
GiB = 2**30
MiB = 2**20


@dataclass(frozen=True)
class Accelerator:
    """One device kind. Bandwidths are bytes/s per device and direction (bus bandwidth, as nccl-tests
    reports it: a ring all-reduce of B bytes over n devices moves 2 (n - 1) / n B through each link)."""
    name: str
    memory_bytes: int
    peak_flops: dict                 # dense matmul FLOP/s by dtype: "fp32", "bf16", "fp16"
    memory_bandwidth: float          # bytes/s of device memory (the optimizer step streams through it)
    intra_node_bandwidth: float      # between devices of one node (NVLink, PCIe; shared memory on CPU)
    inter_node_bandwidth: float      # between nodes (per device: one NIC each)

    def flops(self, dtype: str) -> float:
        if dtype not in self.peak_flops:
            raise ValueError(f"{self.name} has no {dtype} matmul rate in its preset (it has "
                             f"{', '.join(self.peak_flops)}): choose another precision or accelerator")
        return self.peak_flops[dtype]


# Datasheet numbers (dense, without sparsity), from NVIDIA's product pages and datasheets; memory is the total
# nvidia-smi reports (81559 MiB on an H100 80GB: the marketing GB are not all usable bytes).
#   H100 SXM5 80GB: bf16/fp16 989 TFLOP/s, fp32 67 TFLOP/s (no TF32: megatronish leaves torch's default, TF32 off),
#     HBM3 3.35 TB/s, NVLink 4 900 GB/s bidirectional (450 GB/s each way), one 400 Gb/s NDR NIC per GPU (50 GB/s).
#   H200 SXM 141GB: the H100's compute, HBM3e 4.8 TB/s, same NVLink and NICs.
#   A100 SXM 40/80GB: bf16/fp16 312 TFLOP/s, fp32 19.5 TFLOP/s, HBM2 1.555 TB/s (40GB) / HBM2e 2.039 TB/s (80GB),
#     NVLink 3 600 GB/s bidirectional (300 each way), one 200 Gb/s HDR NIC per GPU (25 GB/s).
#   L4 24GB: bf16/fp16 121 TFLOP/s, fp32 30.3 TFLOP/s, 300 GB/s GDDR6, PCIe Gen4 x16 (~25 GB/s achievable each way).
#   T4 16GB: fp16 65 TFLOP/s (no bf16 on Turing), fp32 8.1 TFLOP/s, 320 GB/s GDDR6, PCIe Gen3 x16 (~12 GB/s).
#   Nodes of L4/T4 are assumed connected by 100 Gb/s Ethernet (12.5 GB/s per node, shared by its devices: the
#     per-device figure below assumes 8 per node).
#   cpu: one rank with one thread on this machine's cores; guesses before calibration (a core's AVX2 FMA peak
#     ~50 GFLOP/s at 3 GHz, ~10 GB/s of memory bandwidth per core, shared-memory collectives at ~2 GB/s, TCP
#     between nodes at ~1 GB/s); `tools/plan.py --profile` measures them.
PRESETS = {
    "H100": Accelerator("H100", 81559 * MiB, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 3.35e12, 450e9, 50e9),
    "H200": Accelerator("H200", 143771 * MiB, {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 4.8e12, 450e9, 50e9),
    "A100-80GB": Accelerator("A100-80GB", 81920 * MiB, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
                             2.039e12, 300e9, 25e9),
    "A100-40GB": Accelerator("A100-40GB", 40960 * MiB, {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
                             1.555e12, 300e9, 25e9),
    "L4": Accelerator("L4", 23034 * MiB, {"bf16": 121e12, "fp16": 121e12, "fp32": 30.3e12}, 300e9, 25e9, 12.5e9 / 8),
    "T4": Accelerator("T4", 15360 * MiB, {"fp16": 65e12, "fp32": 8.1e12}, 320e9, 12e9, 12.5e9 / 8),
}


def cpu_accelerator(ranks_per_node: int) -> Accelerator:
    """A CPU rank of this machine: its share of the host memory, and the guesses above."""
    host_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Accelerator("cpu", host_memory // max(1, ranks_per_node), {"fp32": 50e9, "bf16": 50e9, "fp16": 50e9},
                       10e9, 2e9, 1e9)


@dataclass(frozen=True)
class SpeedConstants:
    """What a training step achieves on an accelerator: the constants of the time model.

    Defaults from the datasheet (`for_accelerator`): half the dense matmul peak (large GPT runs of
    Megatron-LM report 40-55% model FLOP utilization on A100/H100), 80% of the link bandwidth (what
    nccl-tests reach for large messages), 20 us per collective or pipeline transfer, an Adam step
    that streams ~36 bytes per fp32 element (parameter, gradient, two moments read; parameter and
    moments written; a bf16 copy) at 80% of the memory bandwidth, and 20 us per layer and
    micro-batch of host work that asynchronous kernel launches do not hide (an assumption: it only
    makes small micro-batches slower, as they are on GPUs, where launches outlast small GEMMs), and
    1 ms per blocking message for a CPU rank waiting behind another for a core (of the order of a
    Linux scheduler time slice; only CPU ranks that outnumber their node's cores pay it).
    """
    flops_per_s: float                 # model FLOP/s per device (the training log's FLOP count / time)
    intra_node_bytes_per_s: float
    inter_node_bytes_per_s: float
    latency_s: float                   # fixed cost of each collective or pipeline transfer
    optimizer_s_per_element: float     # Adam step time per fp32 main element this rank updates
    overhead_s_per_layer_microbatch: float = 0.0  # host-side dispatch per layer and micro-batch (CPU)
    scheduling_wait_s: float = 0.0     # per blocking message and extra rank per core, when CPU ranks outnumber cores

    @classmethod
    def for_accelerator(cls, accelerator: Accelerator, dtype: str) -> "SpeedConstants":
        return cls(flops_per_s=0.5 * accelerator.flops(dtype),
                   intra_node_bytes_per_s=0.8 * accelerator.intra_node_bandwidth,
                   inter_node_bytes_per_s=0.8 * accelerator.inter_node_bandwidth,
                   latency_s=20e-6, optimizer_s_per_element=36 / (0.8 * accelerator.memory_bandwidth),
                   overhead_s_per_layer_microbatch=20e-6, scheduling_wait_s=1e-3)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Cluster:
    """nodes x devices_per_node accelerators; `cores_per_node` (CPU ranks only): ranks beyond it share cores."""
    accelerator: Accelerator
    nodes: int = 1
    devices_per_node: int = 8
    price_per_device_hour: float | None = None
    cores_per_node: int | None = None
    constants: SpeedConstants | None = field(default=None, compare=False)  # None: from the datasheet

    def __post_init__(self):
        for name in ("nodes", "devices_per_node"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"cluster {name} must be a positive integer, got {value!r}")
        if self.price_per_device_hour is not None and self.price_per_device_hour <= 0:
            raise ValueError(f"price per device-hour must be positive, got {self.price_per_device_hour}")

    @property
    def world_size(self) -> int:
        return self.nodes * self.devices_per_node

    def speed(self, dtype: str) -> SpeedConstants:
        return self.constants or SpeedConstants.for_accelerator(self.accelerator, dtype)

    def describe(self) -> str:
        price = f", ${self.price_per_device_hour:g}/device-hour" if self.price_per_device_hour else ""
        return (f"{self.nodes} x {self.devices_per_node} {self.accelerator.name} "
                f"({self.accelerator.memory_bytes / GiB:.0f} GiB each){price}")

    @classmethod
    def from_dict(cls, values: dict) -> "Cluster":
        """{"accelerator": preset name or {Accelerator fields}, "nodes", "devices_per_node", "price_per_device_hour",
        "cores_per_node"}; an accelerator given as a preset name may override fields ("memory_gb", ...)."""
        values = dict(values)
        accelerator = values.pop("accelerator", None)
        if accelerator is None:
            raise ValueError(f"cluster description has no \"accelerator\": give a preset name ({', '.join(PRESETS)}, "
                             "cpu) or an object with the Accelerator fields")
        known = {f.name for f in dataclasses.fields(cls)} - {"accelerator", "constants"}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown cluster field(s) {unknown}: valid fields are accelerator, "
                             f"{', '.join(sorted(known))}")
        devices = values.get("devices_per_node", 8)
        if accelerator == "cpu":  # ranks of this machine share its cores
            values.setdefault("cores_per_node", len(os.sched_getaffinity(0)))
        return cls(accelerator=accelerator_from(accelerator, devices), **values)


def accelerator_from(value, devices_per_node: int) -> Accelerator:
    """A preset name ("H100", "cpu", ...) or a dict of Accelerator fields (memory as "memory_gb" or "memory_bytes")."""
    if isinstance(value, str):
        if value == "cpu":
            return cpu_accelerator(devices_per_node)
        if value not in PRESETS:
            raise ValueError(f"unknown accelerator {value!r}: choose one of {', '.join(PRESETS)}, cpu, or describe it "
                             "with memory_gb, peak_flops, memory_bandwidth, intra/inter_node_bandwidth")
        return PRESETS[value]
    values = dict(value)
    if "memory_gb" in values:
        values["memory_bytes"] = int(values.pop("memory_gb") * GB)
    names = {f.name for f in dataclasses.fields(Accelerator)}
    missing, unknown = sorted(names - set(values)), sorted(set(values) - names)
    if missing or unknown:
        raise ValueError(f"accelerator description: missing {missing}, unknown {unknown}; it needs "
                         f"{', '.join(sorted(names))} (memory may be given as memory_gb)")
    return Accelerator(**values)


def load_cluster(path: str) -> Cluster:
    with open(path) as f:
        try:
            values = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"--cluster {path} is not valid JSON: {error}") from None
    return Cluster.from_dict(values)
