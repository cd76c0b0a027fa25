"""CSIM: dlib face-recognition embeddings of the photos that ship with scikit-image and matplotlib."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from liftavatar.face.photos import real_photos
from liftavatar.metrics.identity import FaceEmbedder, csim, face_model_dir


def half(image: np.ndarray) -> np.ndarray:
    """Half-size copy (faster detection; faces stay over 40 px)."""
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((w // 2, h // 2), Image.BICUBIC))


@pytest.fixture(scope="module")
def photos() -> dict[str, np.ndarray]:
    p = real_photos()
    astronaut = half(p["astronaut"])
    hopper = half(p["grace_hopper"])[:256]  # crop to the astronaut's 256×256
    return {"astronaut": astronaut, "mirrored": np.ascontiguousarray(astronaut[:, ::-1]), "hopper": hopper}


def test_model_files_are_found_without_importing_the_package():
    names = {p.name for p in face_model_dir().iterdir()}
    assert {"dlib_face_recognition_resnet_model_v1.dat", "shape_predictor_5_face_landmarks.dat"} <= names
    import sys

    assert "face_recognition_models" not in sys.modules  # its __init__ needs pkg_resources


def test_same_photo_scores_one_and_another_person_less(photos):
    same = csim(photos["astronaut"][None], photos["astronaut"][None])
    assert same.similarity[0] == pytest.approx(1.0, abs=1e-9) and same.distance[0] == pytest.approx(0.0, abs=1e-9)
    mirrored = csim(photos["mirrored"][None], photos["astronaut"][None])
    other = csim(photos["hopper"][None], photos["astronaut"][None])
    assert other.similarity[0] < mirrored.similarity[0] - 0.05, (other.similarity, mirrored.similarity)
    # dlib's own rule: descriptors closer than 0.6 are the same person.
    assert mirrored.distance[0] < 0.6 < other.distance[0]
    assert 0.0 < other.similarity[0] < 1.0


def test_a_face_missed_in_one_frame_uses_the_other_frames_box_and_none_in_both_is_counted(photos):
    blank = np.full_like(photos["astronaut"], 128)
    embedder = FaceEmbedder()
    assert embedder.detect(blank) is None
    result = csim(np.stack([blank, blank]), np.stack([photos["astronaut"], blank]), embedder)
    assert np.isfinite(result.similarity[0]) and result.similarity[0] < 0.95  # a grey square is no astronaut
    assert np.isnan(result.similarity[1]) and result.missed == [1]
    assert result.mean == pytest.approx(result.similarity[0])


def test_descriptors_are_remembered_by_content_not_by_array(photos):
    embedder = FaceEmbedder()
    calls = []
    compute = embedder._embed
    embedder._embed = lambda image, box: calls.append(box) or compute(image, box)
    first = embedder.embed(photos["astronaut"])
    again = embedder.embed(photos["astronaut"].copy())  # the same pixels in another array: not computed again
    assert len(calls) == 1 and np.array_equal(first, again)
    again[:] = 0  # a caller's copy: changing it leaves the remembered descriptor alone
    assert np.array_equal(embedder.embed(photos["astronaut"]), first)
    changed = photos["astronaut"].copy()
    changed[55:75, 95:125] = 0  # over the eyes and nose (the face box is about (88, 41)-(132, 84))
    box = embedder.detect(photos["astronaut"])
    assert not np.array_equal(embedder.embed(changed, box), first) and len(calls) == 2
    # the same pixels with another box are another descriptor
    embedder.embed(photos["astronaut"], (box[0] + 4, box[1], box[2] + 4, box[3]))
    assert len(calls) == 3
