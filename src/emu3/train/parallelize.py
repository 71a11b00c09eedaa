"""Parallelism, applied to an unmodified model from outside (the model file has no parallel layers).

Order, as in torchtitan: activation checkpointing first (per decoder layer), then FSDP2 (each decoder
layer its own shard group, then the root: embeddings, final norm, output head) or DDP.
"""

from __future__ import annotations

import torch
from torch import nn

from ..model import Emu3LM


def parallelize(model: Emu3LM, mode: str, device: torch.device, activation_checkpointing: bool = False) -> nn.Module:
    """mode: "none", "ddp" or "fsdp" (FSDP2 `fully_shard`). Returns the module to call for training."""
    model.gradient_checkpointing = activation_checkpointing
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

