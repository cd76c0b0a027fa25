"""Where priors live and how one is loaded: a user's directory, or the embedded default shipped in the package.

:class:`PriorConfig` is the one config for loading a prior, shared by `generate`, `lift` and the bench
(:meth:`liftavatar.generator.pipeline.LiftAvatarPipeline.from_pretrained` takes it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from liftavatar.errors import ConfigError

DEFAULT_PRIOR = Path(__file__).resolve().parent / "default_prior"
DTYPES = ("float32", "bfloat16", "float16")


def resolve_prior(path: str | Path | None) -> Path:
    """``path`` if given, else the embedded default prior (DESIGN.md §6)."""
    if path is not None:
        return Path(path)
    if not (DEFAULT_PRIOR / "config.json").is_file():
        raise ConfigError(f"no embedded prior in this installation ({DEFAULT_PRIOR}); "
                          "pass --prior DIR, a prior written by `liftavatar train`.")
    return DEFAULT_PRIOR


@dataclass
class PriorConfig:
    """Which prior to load, with what, and where to run it."""

    prior: Path | None = None
    """Prior directory from `liftavatar train` (default: the embedded prior)."""
    base: Path | None = None
    """Local Wan2.1 weights a LoRA prior was trained on (default: the path the prior records)."""
    vae: Path | None = None
    """Local Wan VAE directory of a prior trained with it (default: the path the prior records)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Precision of the transformer's weights and activations (bfloat16 halves its memory on a GPU)."""
    device: str = "cpu"
    """Torch device to run on (cpu, cuda, cuda:1)."""

    @property
    def path(self) -> Path:
        """The prior directory (:func:`resolve_prior`)."""
        return resolve_prior(self.prior)

    @property
    def torch_dtype(self) -> Any:
        import torch

        if isinstance(self.dtype, torch.dtype):
            return self.dtype
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype}: use one of {', '.join(DTYPES)}.")
        return getattr(torch, self.dtype)

    def identity(self) -> dict[str, Any]:
        """What the weights are, by content (:mod:`liftavatar.fingerprint`): the prior's ``config.json`` and
        weights, the Wan base of a LoRA prior and the VAE of a VAE prior (given here or recorded by the prior),
        and the dtype. The device is left out: it changes the frames by float rounding only."""
        import json

        from liftavatar.fingerprint import tree_digest

        path = self.path
        try:
            recorded = json.loads((path / "config.json").read_text())
        except (OSError, ValueError):
            recorded = {}  # loading the prior says what is wrong with it
        base = self.base or (recorded.get("base_path") if recorded.get("lora") else None)
        codec = (recorded.get("extra") or {}).get("codec") or {}
        vae = self.vae or (codec.get("vae_path") if codec.get("kind") == "wan-vae" else None)
        present = lambda p: None if p is None or not Path(p).exists() else tree_digest(p)  # noqa: E731
        return {"prior": tree_digest(path, ("config.json", "*.safetensors")), "base": present(base),
                "vae": present(vae), "dtype": str(self.dtype).removeprefix("torch.")}
