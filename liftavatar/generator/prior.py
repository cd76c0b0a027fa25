"""Where priors live: a user's directory, or the embedded default shipped inside the package."""

from __future__ import annotations

from pathlib import Path

from liftavatar.errors import ConfigError

DEFAULT_PRIOR = Path(__file__).resolve().parent / "default_prior"


def resolve_prior(path: str | Path | None) -> Path:
    """``path`` if given, else the embedded default prior (DESIGN.md §6)."""
    if path is not None:
        return Path(path)
    if not (DEFAULT_PRIOR / "config.json").is_file():
        raise ConfigError(f"no embedded prior in this installation ({DEFAULT_PRIOR}); "
                          "pass --prior DIR, a prior written by `liftavatar train`.")
    return DEFAULT_PRIOR
