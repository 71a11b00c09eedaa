"""Training checkpoints: sharded model + optimizer state (torch.distributed.checkpoint), the loop's
and every rank's loader state in JSON, written so that a kill at any moment leaves either a
complete checkpoint or one that is ignored.

    RUN/
      config.json                      the TrainConfig
      metrics.csv                      one row per step (loss, lr, grad norm, tokens/s, ...)
      ckpt-00000050/
        state/                         DCP: {"model": ..., "optim": ...}, one file per rank
        rank-00000.json ...            each rank's loader and RNG state
        loop.json                      step, tokens seen, non-finite streak
        COMMITTED                      written last
      .tmp-ckpt-00000100/              a save in progress (ignored; removed by the next save)

Protocol: everything is written into `.tmp-ckpt-N/`; after a barrier rank 0 writes `COMMITTED` and
renames the folder to `ckpt-N/`, then deletes the oldest complete checkpoints beyond `keep_last`
(never the newest complete one). Loading takes the newest folder that has `COMMITTED`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import CheckpointError

_CKPT = re.compile(r"^ckpt-(\d{8})$")


@contextlib.contextmanager
def _quiet_dcp():
    """DCP warns that it assumes one process when no process group exists; that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def checkpoints(run: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not run.is_dir():
        return []
    found = [p for p in run.iterdir() if _CKPT.match(p.name) and (p / "COMMITTED").exists()]
    return sorted(found, key=lambda p: int(_CKPT.match(p.name).group(1)))


def latest(run: Path) -> Path | None:
    found = checkpoints(run)
    return found[-1] if found else None


def _state_dicts(model, optimizer):
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save(run: Path, step: int, model, optimizer, loop: dict, rank_state: dict, rank: int, keep_last: int) -> Path:
    """Collective: every rank calls it."""
    import torch.distributed.checkpoint as dcp

    name = f"ckpt-{step:08d}"
    tmp = run / f".tmp-{name}"
    if rank == 0:
        for stale in run.glob(".tmp-ckpt-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _quiet_dcp():
        dcp.save(_state_dicts(model, optimizer), checkpoint_id=str(tmp / "state"))
    (tmp / f"rank-{rank:05d}.json").write_text(json.dumps(rank_state))
    _barrier()
    if rank == 0:
        (tmp / "loop.json").write_text(json.dumps(loop, indent=1))
        (tmp / "COMMITTED").write_text(f"{step}\n")
        final = run / name
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for old in checkpoints(run)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return run / name


def load(path: Path, model, optimizer, rank: int) -> tuple[dict, dict]:
    """Restore model and optimizer in place; returns (loop state, this rank's state)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_state_dict

    rank_file = path / f"rank-{rank:05d}.json"
    if not rank_file.exists():
        raise CheckpointError(f"{path} has no state for rank {rank}: it was written with fewer processes")
    state = _state_dicts(model, optimizer)
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path / "state"))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((path / "loop.json").read_text()), json.loads(rank_file.read_text())


def load_model_state(path: Path, model) -> None:
    """Model weights only (single process): for export."""
    import torch.distributed.checkpoint as dcp

    state = {"model": model.state_dict()}
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path / "state"))
    model.load_state_dict(state["model"], strict=True)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state().tolist()}
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
