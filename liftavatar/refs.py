"""Reference-frame selection: the K frames of a capture the generator sees the person through.

LiftAvatar conditions the generator on K real frames of the subject (DESIGN.md §1, §6). They should
cover the capture's kinematic range, so that identity and appearance are shown under as many of its
expressions and head poses as K frames allow. The default picks them by K-means:

1. **Features**: per valid frame, the expression coefficients (E values, unitless) and the head
   rotation (3 values, axis-angle in radians), each column standardised to zero mean and unit
   variance over the candidate frames (a column that never varies is left at 0), so that the
   rotation's 3 columns and the expression's E columns are measured in the same unit: standard
   deviations. Translation is left out: it says where the head is, not how it looks.
2. **K-means** (scikit-learn, k-means++ starts, ``n_init`` restarts, seeded) into K clusters.
3. For each centroid, the real frame nearest to it (Euclidean, in the standardised space) — a
   centroid is an average, not a frame. Were two centroids nearest the same frame, the later one
   takes its nearest frame not yet taken, so the K frames are distinct.

Ablations (``method``): ``random`` (K distinct frames drawn with the seed), ``uniform`` (evenly
spaced in time: the middle frame of each of K equal runs of candidate frames), ``farthest``
(farthest-point sampling in the same standardised space, starting from the frame nearest the mean).

Candidates are the frames marked valid and not lifted (provenance 1): references show the real
person, never frames a generator made.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Literal, get_args

import numpy as np

from liftavatar.capture import PROVENANCE_LIFTED, Capture, Kinematics
from liftavatar.errors import LiftAvatarError

__all__ = ["METHODS", "Method", "RefsError", "reference_features", "select_references", "choose_references"]

Method = Literal["kmeans", "random", "uniform", "farthest"]
METHODS: tuple[str, ...] = get_args(Method)
DEFAULT_K = 5


class RefsError(LiftAvatarError):
    """Reference frames cannot be chosen as asked (K out of range, unknown method)."""


def candidate_frames(kinematics: Kinematics, include_lifted: bool = False) -> np.ndarray:
    """Sorted frame indices that may serve as references: valid, and not lifted unless asked."""
    ok = np.asarray(kinematics.valid, bool).copy()
    if not include_lifted:
        ok &= np.asarray(kinematics.provenance) != PROVENANCE_LIFTED
    return np.flatnonzero(ok)


def reference_features(kinematics: Kinematics, indices: np.ndarray) -> np.ndarray:
    """(len(indices), E + 3) float64 standardised expression + rotation of the frames ``indices``.

    Each column has zero mean and unit standard deviation over ``indices`` (columns with zero
    spread stay 0), so distances are in standard deviations.
    """
    x = np.concatenate(
        [np.asarray(kinematics.expression, np.float64)[indices],
         np.asarray(kinematics.rotation, np.float64)[indices]], axis=1)
    x = x - x.mean(axis=0)
    std = x.std(axis=0)
    return x / np.where(std > 1e-12, std, 1.0)


def _check(k: int, method: str, available: int, what: str, source: str) -> None:
    if method not in METHODS:
        raise RefsError(f"--method {method!r} is not a reference-selection method; use one of {', '.join(METHODS)}.")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RefsError(f"-k {k!r}: the number of reference frames must be an integer of at least 1.")
    if available == 0:
        raise RefsError(
            f"{source} has no {what} frame to choose references from; re-track its video (liftavatar track) or use "
            f"a capture with valid frames."
        )
    if k > available:
        raise RefsError(
            f"-k {k} is more than the {available} {what} frames of {source} to choose from; pass -k {available} or "
            f"fewer, or use a longer capture."
        )


def _nearest_distinct(features: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """For each centre in turn, the row of ``features`` nearest to it that no earlier centre took."""
    dist = ((centres[:, None, :] - features[None, :, :]) ** 2).sum(-1)  # (K, M)
    taken = np.zeros(len(features), bool)
    picks = []
    for row in dist:
        order = np.argsort(row, kind="stable")
        pick = next(int(i) for i in order if not taken[i])
        taken[pick] = True
        picks.append(pick)
    return np.array(picks, np.intp)


def _kmeans(features: np.ndarray, k: int, seed: int, n_init: int) -> np.ndarray:
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        # Fewer distinct frames than K: K-means says so and returns duplicate centroids, which
        # _nearest_distinct still turns into K distinct frames.
        warnings.simplefilter("ignore", ConvergenceWarning)
        model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(features)
    return _nearest_distinct(features, model.cluster_centers_)


def _farthest(features: np.ndarray, k: int) -> np.ndarray:
    first = int(np.argmin(((features - features.mean(0)) ** 2).sum(1)))
    picks = [first]
    dist = ((features - features[first]) ** 2).sum(1)
    for _ in range(k - 1):
        dist[picks] = -1.0  # never pick a frame twice, even among duplicates
        nxt = int(np.argmax(dist))
        picks.append(nxt)
        dist = np.minimum(dist, ((features - features[nxt]) ** 2).sum(1))
    return np.array(picks, np.intp)


def select_references(
    kinematics: Kinematics,
    k: int = DEFAULT_K,
    method: Method = "kmeans",
    seed: int = 0,
    *,
    include_lifted: bool = False,
    n_init: int = 10,
    source: str = "the capture",
) -> np.ndarray:
    """Choose ``k`` reference frames of one capture's kinematics (see the module docstring).

    Args:
        kinematics: the capture's per-frame kinematics (expression unitless, rotation axis-angle
            in radians); only ``valid`` frames (and, unless ``include_lifted``, not lifted ones)
            are candidates.
        k: number of references, 1 ≤ k ≤ the number of candidate frames.
        method: ``kmeans`` (default), ``random``, ``uniform`` or ``farthest``.
        seed: seeds K-means' starts and ``random``; the same inputs and seed give the same
            frames. ``uniform`` and ``farthest`` do not use it.
        include_lifted: also allow lifted frames (provenance 1).
        n_init: K-means restarts (the best of them is kept).
        source: what the error messages name (the capture's path when known).

    Returns:
        (k,) int64 frame indices into the capture, sorted ascending, unique.

    Raises:
        RefsError: ``k`` < 1 or more than the candidate frames, no candidate frame at all, or an unknown
            ``method``.
    """
    candidates = candidate_frames(kinematics, include_lifted)
    _check(k, method, len(candidates), "valid" if include_lifted else "valid, observed", source)
    k = int(k)
    if method == "uniform":
        local = ((np.arange(k) + 0.5) * len(candidates) / k).astype(np.intp)
    elif method == "random":
        local = np.random.default_rng(seed).choice(len(candidates), size=k, replace=False)
    else:
        features = reference_features(kinematics, candidates)
        local = _kmeans(features, k, seed, n_init) if method == "kmeans" else _farthest(features, k)
    chosen = np.sort(candidates[local]).astype(np.int64)
    assert len(np.unique(chosen)) == k
    return chosen


def choose_references(
    capture: Capture | str | Path,
    k: int = DEFAULT_K,
    method: Method = "kmeans",
    seed: int = 0,
    *,
    include_lifted: bool = False,
) -> np.ndarray:
    """Select references for a capture (see :func:`select_references`) and store them in its
    ``capture.json`` (``reference_indices``, rewritten atomically); returns the sorted indices.

    Raises:
        RefsError: as :func:`select_references`; CaptureError: the capture does not load.
    """
    if not isinstance(capture, Capture):
        capture = Capture.load(capture)
    indices = select_references(capture.kinematics, k, method, seed, include_lifted=include_lifted,
                                source=f"capture {capture.path}")
    capture.set_reference_indices([int(i) for i in indices])
    return indices
