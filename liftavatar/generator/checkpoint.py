"""Training checkpoints as safetensors (no pickle): model or adapter, optimizer, scheduler, EMA, step.

safetensors holds flat tensor dicts; an optimizer's state is nested and mixes tensors with numbers,
so tensors go to ``*.safetensors`` under flattened keys and everything else to ``state.json``.
A checkpoint directory is complete once ``state.json`` exists (it is written last, atomically).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from liftavatar.errors import ConfigError

STATE_NAME = "state.json"


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """torch optimizer ``state_dict()`` → (tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for pid, pstate in state["state"].items():
        for name, value in pstate.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(rest["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save_checkpoint(directory: Path, model_state: dict[str, torch.Tensor], optimizer_state: dict[str, Any],
                    scheduler_state: dict[str, Any], step: int, extra: dict[str, Any],
                    ema_state: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    """Write ``directory/step_XXXXXXXX/`` and prune all but the newest ``keep`` complete checkpoints."""
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
    state = {"step": step, "optimizer": opt_rest, "scheduler": scheduler_state, **extra}
    (partial / STATE_NAME).write_text(json.dumps(state))
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
    """{'model', 'optimizer', 'scheduler', 'ema' (or None), 'step', and the extra keys}."""
    try:
        state = json.loads((path / STATE_NAME).read_text())
        model = load_file(str(path / "model.safetensors"))
        optimizer = optimizer_from_flat(load_file(str(path / "optimizer.safetensors")), state.pop("optimizer"))
        ema_path = path / "ema.safetensors"
        ema = load_file(str(ema_path)) if ema_path.is_file() else None
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise ConfigError(f"{path}: unreadable checkpoint ({exc}); delete it to resume from the one before.") from exc
    return {**state, "model": model, "optimizer": optimizer, "ema": ema}
