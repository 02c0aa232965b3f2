"""Several processes, one model copy each: ``layerwise tune`` with data parallelism, through ``accelerate``'s DDP.

Layer-selective training changes which parameters receive gradients while it
runs (LISA redraws units, BAdam cycles them), and DDP builds its gradient
reducer once, from the parameters that require a gradient when it wraps the
model: a unit frozen then would never be all-reduced later, and a registered
parameter that gets no gradient stalls the reducer unless DDP looks for
unused ones. So :func:`train` wraps the model while every tunable parameter
requires a gradient, before the selector freezes anything, with
``find_unused_parameters=True``: each backward pass DDP walks the autograd
graph, marks the frozen units' parameters unused, and, as every process
freezes the same units (the schedule is a function of seed and step, and
``adaptive``'s scores come from the all-reduced gradients), leaves their
``.grad`` untouched (``None``), so AdamW still gives them no state. The
cost: that walk every step, and reducer buckets sized for every tunable
parameter, whether it trains now or not.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
from accelerate.utils import DistributedType

from ..errors import LayerwiseError
from ..loading import resolve_device

#: One process, or DDP over CPUs (gloo) or GPUs (NCCL). FSDP and DeepSpeed shard parameters or optimizer state,
#: which the selector's per-parameter freezing and state release do not know about.
SUPPORTED = (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU)


def processes(device: str | torch.device) -> PartialState:
    """The processes a launcher (``accelerate launch``, ``torchrun``) started, their group joined once (a singleton);
    gloo when the model is on the CPU. One process when nothing launched several."""
    return PartialState(cpu=torch.device(resolve_device(str(device))).type == "cpu")


def accelerator(device: torch.device) -> Accelerator:
    """An ``Accelerator`` whose DDP tolerates units switched off (see the module), placing nothing: the model trains
    where it was loaded, in its own dtype. Its ``cpu`` follows the processes' state, which the first call in a
    process set (accelerate refuses to change it, and in one process it places nothing here anyway)."""
    acc = Accelerator(
        cpu=processes(device).device.type == "cpu",
        device_placement=False,
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    if acc.distributed_type not in SUPPORTED:
        raise LayerwiseError(
            f"tune runs in one process or with DDP (accelerate's MULTI_CPU or MULTI_GPU), not "
            f"{acc.distributed_type.value}: FSDP and DeepSpeed shard what the selector freezes and frees"
        )
    if acc.mixed_precision != "no":
        raise LayerwiseError(
            f"tune trains in the model's dtype; launch without --mixed_precision {acc.mixed_precision} and use "
            "--dtype bfloat16 instead"
        )
    return acc


def process_device(device: str) -> str:
    """Where this process loads the model: with several processes on GPUs, its own one (DDP wants each process on
    a different GPU), else ``device`` as given."""
    state = processes(device)
    return str(state.device) if state.num_processes > 1 and state.device.type == "cuda" else device


def is_main_process(device: str | torch.device) -> bool:
    """Whether this process writes the outputs: the only one, or the first of several."""
    return processes(device).is_main_process
