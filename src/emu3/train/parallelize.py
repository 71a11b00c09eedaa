"""Parallelism, applied to an unmodified model from outside (the model file has no parallel layers).

Order, as in torchtitan: activation checkpointing first (per decoder layer), then `torch.compile` of
each decoder layer, then FSDP2 (each decoder layer its own shard group, then the root: embeddings, final
norm, output head) or DDP. Compiling per layer (`nn.Module.compile`, in place) keeps the parameter names,
so checkpoints are the same with or without it, and the identical layers share one compiled graph.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from ..errors import InputError
from ..model import Emu3LM


def parallelize(model: Emu3LM, mode: str, device: torch.device, activation_checkpointing: bool = False,
                compile: bool = False) -> nn.Module:
    """mode: "none", "ddp" or "fsdp" (FSDP2 `fully_shard`). Returns the module to call for training."""
    model.gradient_checkpointing = activation_checkpointing
    if compile:
        if device.type == "cpu" and not has_cxx_compiler():
            raise InputError("compile=on on a CPU needs a C++ compiler (inductor builds C++ kernels) and none of "
                             "$CXX, g++, c++, clang++ was found: install one, or train with compile=off")
        for layer in model.model.layers:
            layer.compile()
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    return model


def has_cxx_compiler() -> bool:
    """Whether inductor can build its CPU kernels: $CXX or a usual C++ compiler on the PATH."""
    return any(shutil.which(c) for c in (os.environ.get("CXX"), "g++", "c++", "clang++") if c)
