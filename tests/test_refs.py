"""Reference-frame selection: K-means covers the kinematic clusters, picks are real valid frames,
deterministic for a seed, stored in capture.json; bad K or method is refused with exit 2."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from liftavatar.capture import PROVENANCE_LIFTED, PROVENANCE_OBSERVED, Capture, CaptureMeta, Kinematics, write_capture
from liftavatar.cli import main
from liftavatar.refs import METHODS, RefsError, choose_references, reference_features, select_references

E = 6  # expression coefficients
SIZE = 16


def clustered_kinematics(clusters: int = 5, per_cluster: int = 20, seed: int = 0, shuffle: bool = True) -> tuple[Kinematics, np.ndarray]:
    """``clusters`` well-separated expression clusters (tight noise around distinct centres, pose
    nearly constant), frames interleaved in time. Returns the kinematics and each frame's cluster."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((clusters, E))
    for c in range(clusters):
        centres[c, c % E] = 0.9  # cluster c: expression c at 0.9, the others near 0
    labels = np.repeat(np.arange(clusters), per_cluster)
    if shuffle:
        labels = rng.permutation(labels)
    n = len(labels)
    expression = np.clip(centres[labels] + rng.normal(0, 0.02, (n, E)), 0, 1)
    rotation = rng.normal(0, 0.005, (n, 3))
    kin = Kinematics(
        expression=expression.astype(np.float32),
        rotation=rotation.astype(np.float32),
        translation=np.tile(np.float32([0, 0, 0.6]), (n, 1)),
        valid=np.ones(n, bool),
        provenance=np.full(n, PROVENANCE_OBSERVED, np.uint8),
        identity=np.zeros(4, np.float32),
    )
    return kin, labels


def write_small_capture(path: Path, kin: Kinematics) -> Capture:
    n = len(kin)
    meta = CaptureMeta(
        subject="refs-test", fps=25.0, size=(SIZE, SIZE), intrinsics=(20.0, 20.0, SIZE / 2, SIZE / 2),
        rig={"name": "test-rig", "version": "1"}, expression_names=[f"e{i}" for i in range(E)],
        creator={"verb": "test", "version": "0", "config": {}},
    )
    frames = np.zeros((n, SIZE, SIZE, 3), np.uint8)
    masks = np.zeros((n, SIZE, SIZE), np.uint8)
    return write_capture(path, meta, kin, frames, masks, frames)


def test_kmeans_takes_one_frame_from_each_cluster():
    kin, labels = clustered_kinematics(clusters=5)
    for seed in range(3):
        refs = select_references(kin, 5, "kmeans", seed)
        assert sorted(labels[refs].tolist()) == [0, 1, 2, 3, 4], (seed, refs, labels[refs])


def test_kmeans_pick_is_the_frame_nearest_its_cluster_centre():
    kin, labels = clustered_kinematics(clusters=3, per_cluster=15)
    refs = select_references(kin, 3, "kmeans", 0)
    features = reference_features(kin, np.arange(len(kin)))
    for r in refs:
        members = np.flatnonzero(labels == labels[r])
        centre = features[members].mean(0)  # the K-means centroid of a well-separated cluster
        nearest = members[np.argmin(((features[members] - centre) ** 2).sum(1))]
        assert r == nearest


def test_rotation_clusters_count_too():
    """Two head poses with the same expression are different references (rotation is a feature)."""
    kin, _ = clustered_kinematics(clusters=1, per_cluster=40)
    turned = np.arange(len(kin)) % 2 == 1
    kin.rotation[turned, 1] += 0.6  # yaw ~34° on every other frame
    refs = select_references(kin, 2, "kmeans", 0)
    assert sorted(turned[refs].tolist()) == [False, True]


@pytest.mark.parametrize("method", METHODS)
def test_deterministic_sorted_unique_valid(method):
    kin, _ = clustered_kinematics(clusters=4, per_cluster=12, seed=3)
    kin.valid[::3] = False  # every third frame failed tracking
    kin.provenance[1::5] = PROVENANCE_LIFTED  # and some are generated frames
    a = select_references(kin, 6, method, seed=11)
    b = select_references(kin, 6, method, seed=11)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.int64 and len(a) == 6
    assert np.all(np.diff(a) > 0), "sorted and unique"
    assert kin.valid[a].all(), "only valid frames"
    assert (kin.provenance[a] != PROVENANCE_LIFTED).all(), "never a lifted frame"
    # Lifted frames become candidates only when asked for.
    with_lifted = select_references(kin, int(kin.valid.sum()), method, seed=11, include_lifted=True)
    assert (kin.provenance[with_lifted] == PROVENANCE_LIFTED).any()


def test_random_depends_on_seed_and_uniform_is_evenly_spaced():
    kin, _ = clustered_kinematics(clusters=2, per_cluster=50)
    draws = {tuple(select_references(kin, 5, "random", seed)) for seed in range(5)}
    assert len(draws) > 1
    np.testing.assert_array_equal(select_references(kin, 4, "uniform"), [12, 37, 62, 87])  # middles of 4 runs of 25
    kin.valid[:50] = False
    np.testing.assert_array_equal(select_references(kin, 2, "uniform"), [62, 87])


def test_farthest_spreads_out():
    """On points on a line, farthest-point sampling takes the middle, then both ends."""
    n = 21
    kin, _ = clustered_kinematics(clusters=1, per_cluster=n, shuffle=False)
    kin.expression[:] = 0
    kin.expression[:, 0] = np.linspace(0, 1, n)
    kin.rotation[:] = 0
    np.testing.assert_array_equal(select_references(kin, 3, "farthest"), [0, 10, 20])


def test_duplicate_frames_still_give_k_distinct_references():
    kin, _ = clustered_kinematics(clusters=2, per_cluster=5)
    kin.expression[:] = kin.expression[0]
    kin.rotation[:] = kin.rotation[0]  # ten identical frames
    for method in METHODS:
        refs = select_references(kin, 4, method)
        assert len(np.unique(refs)) == 4


@pytest.mark.parametrize(
    "k, method, needle",
    [(11, "kmeans", "-k 11"), (0, "kmeans", "-k 0"), (-2, "uniform", "-k -2"), (3, "spectral", "spectral")],
)
def test_bad_input_is_refused(k, method, needle):
    kin, _ = clustered_kinematics(clusters=2, per_cluster=5)
    with pytest.raises(RefsError, match=needle) as info:
        select_references(kin, k, method)
    message = str(info.value)
    assert message.count(". ") == 0 and message.endswith("."), "one sentence"


def test_k_counts_valid_frames_only():
    kin, _ = clustered_kinematics(clusters=2, per_cluster=5)
    kin.valid[:7] = False
    with pytest.raises(RefsError, match=r"-k 4 is more than the 3 valid"):
        select_references(kin, 4)
    assert len(select_references(kin, 3)) == 3


def test_stored_in_capture_and_reloaded(tmp_path):
    kin, labels = clustered_kinematics(clusters=5, per_cluster=6)
    capture = write_small_capture(tmp_path / "cap", kin)
    refs = choose_references(capture, 5, "kmeans", seed=2)
    assert capture.meta.reference_indices == refs.tolist()
    data = json.loads((tmp_path / "cap" / "capture.json").read_text())
    assert data["reference_indices"] == refs.tolist()
    assert Capture.load(tmp_path / "cap").meta.reference_indices == refs.tolist()
    assert sorted(labels[refs].tolist()) == [0, 1, 2, 3, 4]


def test_cli_refs(tmp_path, capsys):
    kin, _ = clustered_kinematics(clusters=3, per_cluster=4)
    write_small_capture(tmp_path / "cap", kin)
    assert main(["refs", str(tmp_path / "cap"), "-k", "3", "--method", "farthest"]) == 0
    stored = Capture.load(tmp_path / "cap").meta.reference_indices
    assert stored == select_references(kin, 3, "farthest").tolist()
    assert " ".join(map(str, stored)) in capsys.readouterr().out
    # Defaults: K-means, K = 5, seed 0.
    assert main(["refs", str(tmp_path / "cap")]) == 0
    assert Capture.load(tmp_path / "cap").meta.reference_indices == select_references(kin, 5, "kmeans", 0).tolist()


def test_cli_refs_bad_k_exits_2(tmp_path):
    kin, _ = clustered_kinematics(clusters=2, per_cluster=3)
    write_small_capture(tmp_path / "cap", kin)
    result = subprocess.run([sys.executable, "-m", "liftavatar.cli", "refs", str(tmp_path / "cap"), "-k", "9"],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert "-k 9" in result.stderr and "Traceback" not in result.stderr
    assert Capture.load(tmp_path / "cap").meta.reference_indices is None, "nothing stored"
