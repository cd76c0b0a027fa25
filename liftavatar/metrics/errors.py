"""Errors of the metrics package."""

from __future__ import annotations

from liftavatar.errors import LiftAvatarError


class MetricsError(LiftAvatarError):
    """Inputs that cannot be compared (mismatched sizes or counts, unreadable sources)."""


class MissingWeightsError(MetricsError):
    """A learned metric's standard weights are not on this machine; the metric is skipped."""
