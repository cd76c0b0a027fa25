"""Training checkpoints as safetensors (no pickle): model or adapter, optimizer, scheduler, EMA, step.

safetensors holds flat tensor dicts; an optimizer's state is nested and mixes tensors with numbers,
so tensors go to ``*.safetensors`` under flattened keys and everything else to ``state.json``.
A checkpoint directory is complete once ``state.json`` exists (it is written last, atomically).

A checkpoint does not depend on how many processes wrote it, or how they sharded the model: it
holds *full* (gathered) tensors, and the optimizer state is keyed by parameter name (the layout of
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(full_state_dict=True)``), not by
the optimizer's parameter ids. Single process, DDP and FSDP2 write and read the same files, so a
run written by N processes resumes on M. Gathering and re-sharding go through torch's own APIs
(``torch.distributed.checkpoint.state_dict`` for model and optimizer, ``DTensor.full_tensor`` /
``distribute_tensor`` for the EMA), never a hand-made collective. Checkpoints written before the
name-keyed layout (optimizer state keyed by integer ids) still load.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from liftavatar.errors import ConfigError
from liftavatar.io import atomic_write, write_json

STATE_NAME = "state.json"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    atomic_write(path, lambda tmp: save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp)))


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimizer state dict (keyed by parameter id or by parameter name) → (tensors, JSON-able rest).
    Keys are ``"<parameter>.<state name>"``; a parameter name may hold dots, a state name (exp_avg…) never."""
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int | str, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        pid, name = key.rsplit(".", 1)
        state.setdefault(int(pid) if pid.isdigit() else pid, {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


# ---- process-count-independent state (single process, DDP, FSDP2) --------------------------------


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_model_state(model: torch.nn.Module, keys: Collection[str]) -> dict[str, torch.Tensor]:
    """The full (unsharded) tensors of ``keys`` of a sharded model, on the CPU of rank 0 ({} elsewhere).

    A collective: every process calls it. Frozen parameters are left out before gathering (a LoRA run
    on a 14B base gathers only the adapter and LiftAvatar's modules); buffers are kept."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options(cpu_offload=True, ignore_frozen_params=True))
    wanted = set(keys)
    return {k: v for k, v in state.items() if k in wanted}


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's full state keyed by parameter name (``get_optimizer_state_dict``), on the CPU.

    ``model`` is the (unwrapped) model the optimizer trains: plain, DDP-unwrapped or FSDP2-sharded. A
    collective under FSDP: every process calls it; with sharding only rank 0 receives the state."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=_options(cpu_offload=True))


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a checkpoint's optimizer state into ``optimizer`` (sharding it when the model is sharded).

    Every process passes the full state it read from disk. The state of a checkpoint written before
    states were keyed by name (integer ids) loads as the plain ``optimizer.load_state_dict``."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    ids = [p for group in state["param_groups"] for p in group["params"]]
    if ids and all(isinstance(p, int) for p in ids):
        optimizer.load_state_dict(state)
        return
    set_optimizer_state_dict(model, optimizer, state, options=_options())


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded (DTensor) entries gathered whole (``DTensor.full_tensor``, a collective), all on the CPU."""
    from torch.distributed.tensor import DTensor

    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in tensors.items()}


def shard_like(tensors: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full tensors → the sharding (or device) of ``like``'s entries: each process keeps its own shard of
    the full tensor it read (``distribute_tensor`` without communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    out = {}
    for k, ref in like.items():
        v = tensors[k].to(ref.device if not isinstance(ref, DTensor) else ref.to_local().device, ref.dtype)
        out[k] = distribute_tensor(v, ref.device_mesh, ref.placements, src_data_rank=None) \
            if isinstance(ref, DTensor) else v
    return out


_OWN_FILES = ("model", "optimizer", "ema")


def save_checkpoint(directory: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    scheduler_state: dict[str, Any], step: int, extra: dict[str, Any],
                    ema_state: dict[str, torch.Tensor] | None = None, keep: int = 2,
                    tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write ``directory/step_XXXXXXXX/`` and prune all but the newest ``keep`` complete checkpoints.

    ``tensors``: further named tensor dicts (the best weights so far of an adaptation run), one
    ``<name>.safetensors`` each; :func:`load_checkpoint` returns them under ``"tensors"``."""
    target = directory / f"step_{step:08d}"
    partial = directory / f".step_{step:08d}.partial"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    _atomic_save(model_state, partial / "model.safetensors")
    opt_tensors, opt_rest = optimizer_to_flat(optimizer_state)
    _atomic_save(opt_tensors, partial / "optimizer.safetensors")
    if ema_state is not None:
        _atomic_save(ema_state, partial / "ema.safetensors")
    for name, values in (tensors or {}).items():
        if name in _OWN_FILES or not name.isidentifier():
            raise ValueError(f"checkpoint tensors {name!r}: use a name other than {', '.join(_OWN_FILES)}")
        _atomic_save(values, partial / f"{name}.safetensors")
    state = {"step": step, "optimizer": opt_rest, "scheduler": scheduler_state, **extra}
    write_json(partial / STATE_NAME, state, indent=None)
    if target.exists():
        shutil.rmtree(target)
    partial.replace(target)
    for old in complete_checkpoints(directory)[:-keep]:
        shutil.rmtree(old)
    return target


def complete_checkpoints(directory: Path) -> list[Path]:
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.glob("step_*") if (p / STATE_NAME).is_file())


def load_checkpoint(path: Path) -> dict[str, Any]:
    """{'model', 'optimizer', 'scheduler', 'ema' (or None), 'tensors' (the further named tensor dicts), 'step',
    and the extra keys}."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
        model = load_file(str(path / "model.safetensors"))
        optimizer = optimizer_from_flat(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
        ema_path = path / "ema.safetensors"
        ema = load_file(str(ema_path)) if ema_path.is_file() else None
        tensors = {p.stem: load_file(str(p)) for p in sorted(path.glob("*.safetensors")) if p.stem not in _OWN_FILES}
    except (OSError, json.JSONDecodeError, KeyError, SafetensorError) as exc:
        raise ConfigError(f"{path}: unreadable checkpoint ({exc}); delete it to resume from the one before.") from exc
    return {**state, "model": model, "optimizer": optimizer, "ema": ema, "tensors": tensors}
