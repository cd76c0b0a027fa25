"""Where the learned metrics' standard weights are looked for (never downloaded).

LPIPS needs two files: torchvision's ImageNet AlexNet (``alexnet-owt-7be5be79.pth``) and LPIPS
v0.1's linear heads for it (``alex.pth``, shipped inside the ``lpips`` package). FID needs
pytorch-fid's port of the TensorFlow FID Inception (``pt_inception-2015-12-05-6726825d.pth``).

Searched, in order: the path given as an option (a file, or a folder holding the files), the
environment variable (``LIFTAVATAR_LPIPS_WEIGHTS`` / ``LIFTAVATAR_FID_WEIGHTS``, same forms),
torch hub's checkpoint folder (``$TORCH_HOME/hub/checkpoints``, where torchvision, lpips and
pytorch-fid cache their downloads), and, for the LPIPS heads, an installed ``lpips`` package.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from liftavatar.metrics.errors import MissingWeightsError

__all__ = ["LPIPS_ENV", "FID_ENV", "LpipsWeights", "find_lpips_weights", "find_fid_weights"]

LPIPS_ENV = "LIFTAVATAR_LPIPS_WEIGHTS"
FID_ENV = "LIFTAVATAR_FID_WEIGHTS"
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_LIN_FILE = "alex.pth"
FID_INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"


@dataclass(frozen=True)
class LpipsWeights:
    backbone: Path  # torchvision AlexNet state dict
    heads: Path  # LPIPS v0.1 linear heads (lin0..lin4)


def _hub_checkpoints() -> Path:
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def _places(option: str | Path | None, env: str) -> list[Path]:
    places = [Path(p) for p in (option, os.environ.get(env)) if p]
    return places + [_hub_checkpoints()]


def _find(name: str, places: list[Path]) -> Path | None:
    for place in places:
        if place.is_file() and place.name == name:
            return place
        if place.is_dir() and (place / name).is_file():
            return place / name
    return None


def _lpips_package_heads() -> Path | None:
    spec = importlib.util.find_spec("lpips")  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / LPIPS_LIN_FILE
    return path if path.is_file() else None


def find_lpips_weights(option: str | Path | None = None) -> LpipsWeights:
    """The LPIPS (AlexNet, v0.1) weight files, or :class:`MissingWeightsError` saying what is absent."""
    places = _places(option, LPIPS_ENV)
    if option is not None and not Path(option).exists():
        raise MissingWeightsError(f"--lpips-weights {option}: no such file or folder; pass the folder holding "
                                  f"{ALEXNET_FILE} and {LPIPS_LIN_FILE}.")
    backbone = _find(ALEXNET_FILE, places)
    heads = _find(LPIPS_LIN_FILE, places) or _lpips_package_heads()
    missing = [name for name, found in ((ALEXNET_FILE, backbone), (LPIPS_LIN_FILE, heads)) if found is None]
    if missing:
        where = ", ".join(str(p) for p in places)
        raise MissingWeightsError(
            f"LPIPS skipped: its weights ({' and '.join(missing)}) are not on this machine (looked in {where}); "
            f"copy torchvision's AlexNet and LPIPS v0.1's alex.pth into a folder and pass --lpips-weights DIR "
            f"or set {LPIPS_ENV}."
        )
    return LpipsWeights(backbone, heads)


def find_fid_weights(option: str | Path | None = None) -> Path:
    """The FID Inception weight file, or :class:`MissingWeightsError` saying it is absent."""
    if option is not None and not Path(option).exists():
        raise MissingWeightsError(f"--fid-weights {option}: no such file or folder; pass {FID_INCEPTION_FILE} "
                                  f"or the folder holding it.")
    places = _places(option, FID_ENV)
    # A file named by the option or the variable is taken whatever it is called.
    found = next((p for p in places if p.is_file()), None) or _find(FID_INCEPTION_FILE, places)
    if found is None:
        where = ", ".join(str(p) for p in places)
        raise MissingWeightsError(
            f"FID skipped: its Inception weights ({FID_INCEPTION_FILE}, pytorch-fid's port of the TensorFlow FID "
            f"network) are not on this machine (looked in {where}); pass --fid-weights FILE or set {FID_ENV}."
        )
    return found
