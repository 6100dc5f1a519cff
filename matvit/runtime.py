"""Where a run computes: the device, the numeric precision, and the process group torchrun sets up.

`torchrun --nproc-per-node N [--nnodes M ...]` starts N processes per machine with RANK, WORLD_SIZE and
LOCAL_RANK in their environment; `start` joins them into one process group (nccl on CUDA, gloo otherwise) and
gives each process its device. Everything else asks the returned `Runtime` (`main`, `barrier`, `wrap`, `autocast`)
instead of touching torch.distributed or the device itself.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`: CUDA when present, then Apple's MPS, else the CPU; an absent device named explicitly is refused."""
    if name not in DEVICES:
        raise UserError(f"unknown device {name!r}; use one of {', '.join(DEVICES)}")
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if name == "cuda" and not cuda:
        raise UserError("--device cuda: no CUDA device is visible to PyTorch here; use --device cpu or auto")
    if name == "mps" and not mps:
        raise UserError("--device mps: Apple's MPS backend is not available here; use --device cpu or auto")
    if name == "cuda" or (name == "auto" and cuda):
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    if name == "mps" or (name == "auto" and mps):
        return torch.device("mps")
    return torch.device("cpu")


@dataclass
class Runtime:
    """One process of a run: its device, precision, whether to `torch.compile`, and its place in the group."""

    device: torch.device
    precision: str = "fp32"
    compile: bool = False
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; use one of {', '.join(PRECISIONS)}")

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """The process that logs, writes checkpoints and evaluates."""
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for forwards and losses (off at fp32); backward runs outside it."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=PRECISIONS[self.precision])

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling against fp16 gradient underflow; a pass-through at fp32 and bf16."""
        return torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` on this device, in DistributedDataParallel across the group, compiled when asked. The
        returned module shares its parameters with `module`."""
        module.to(self.device)
        if self.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            module = torch.nn.parallel.DistributedDataParallel(module, device_ids=ids)
        return torch.compile(module) if self.compile else module

    def no_sync(self, module: torch.nn.Module, skip: bool) -> contextlib.AbstractContextManager:
        """Inside, a DDP `module`'s backward accumulates gradients locally without the all-reduce (when `skip`);
        the next backward outside all-reduces the sum."""
        ddp = getattr(module, "_orig_mod", module)  # under torch.compile
        if skip and isinstance(ddp, torch.nn.parallel.DistributedDataParallel):
            return ddp.no_sync()
        return contextlib.nullcontext()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_sum(self, values: torch.Tensor) -> torch.Tensor:
        """Elementwise sum of a CPU tensor over all processes."""
        if self.distributed:
            values = values.to(self.device)
            dist.all_reduce(values)
        return values.cpu()

    def broadcast(self, obj):
        """The main process's `obj`, on every process."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def __enter__(self) -> Runtime:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def start(device: str = "auto", precision: str = "fp32", compile: bool = False) -> Runtime:
    """This process's runtime: alone, or one of torchrun's processes (WORLD_SIZE > 1), joined to the group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world)
    return Runtime(dev, precision, compile, rank, world)
