"""Shared pytest set-up: tests marked `gpu` run only where CUDA is available; helpers several test files use."""

from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def tiny_prior(path, seed: int = 0, size: int = 32, frames: int = 3):
    """An untrained tiny prior for ``size``² frames (pixel codec ×2, the rig's 43 controls), windows of ``frames``;
    returns ``path``."""
    from liftavatar.generator.transformer import LiftAvatarTransformer

    LiftAvatarTransformer.from_preset("tiny", 43, in_channels=12, out_channels=12, seed=seed).save_pretrained(
        path, extra={"codec": {"kind": "pixel", "factor": 2, "vae_path": None}, "frames": frames, "size": size})
    return path
