"""Synthetic subjects: a seed becomes an identity, an appearance (texture atlas), lighting and background.

The face texture is the packaged astronaut photo crop (a real face, so MediaPipe sees a face),
recoloured and varied procedurally: skin tone, freckles, stubble or beard, brow thickness and
colour, lip colour, hair on the head shell, iris colour. Everything is drawn from one
``numpy.random.Generator`` seeded by the subject seed, so a seed always gives the same subject.
Hand-written: no library synthesises face appearance from a photo without downloaded models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from scipy.ndimage import gaussian_filter

from liftavatar.face.rig import FaceRig, face_texture

ATLAS_SIZE = 1024

# Skin tones (linear-ish sRGB in [0, 1]) from very light to very dark; a subject interpolates two.
SKIN_TONES = np.array(
    [[0.96, 0.80, 0.69], [0.90, 0.72, 0.58], [0.80, 0.60, 0.46], [0.67, 0.47, 0.33], [0.50, 0.33, 0.22], [0.33, 0.21, 0.14]]
)
HAIR_COLOURS = np.array(
    [[0.08, 0.06, 0.05], [0.22, 0.14, 0.08], [0.40, 0.26, 0.14], [0.65, 0.50, 0.30], [0.55, 0.22, 0.10], [0.60, 0.60, 0.58]]
)
IRIS_COLOURS = np.array([[0.30, 0.18, 0.08], [0.15, 0.09, 0.05], [0.25, 0.40, 0.60], [0.30, 0.45, 0.30], [0.45, 0.40, 0.25]])


@dataclass
class Subject:
    """One synthetic person. Colours are RGB in [0, 1]; directions are in the camera frame."""

    seed: int
    identity: np.ndarray  # (I,) float32 in [-1, 1]
    skin: np.ndarray
    hair: np.ndarray
    lips: np.ndarray
    iris: np.ndarray
    brow_thickness: float  # 0 thin .. 1 bushy
    freckles: float  # 0 none .. 1 many
    beard: float  # 0 none, ~0.3 stubble, 1 full beard
    hair_coverage: float  # 0 bald .. 1 low hairline
    clothing: np.ndarray
    light_direction: np.ndarray  # unit, from the surface toward the light
    light_colour: np.ndarray
    ambient: np.ndarray
    background: tuple[np.ndarray, np.ndarray]  # top and bottom colours of a vertical gradient
    texture: np.ndarray = field(repr=False, default=None)  # (ATLAS_SIZE, ATLAS_SIZE, 3) float32

    @property
    def name(self) -> str:
        return f"synth-{self.seed:06d}"


def make_subject(seed: int, rig: FaceRig | None = None) -> Subject:
    """The subject of ``seed`` (deterministic), with its texture atlas built."""
    rig = rig or FaceRig.load()
    rng = np.random.default_rng([seed, 0x5EED])
    identity = np.clip(rng.normal(0.0, 0.45, rig.num_identity), -1, 1).astype(np.float32)
    tone = rng.uniform(0, len(SKIN_TONES) - 1)
    lo = int(np.floor(tone))
    skin = SKIN_TONES[lo] + (tone - lo) * (SKIN_TONES[min(lo + 1, len(SKIN_TONES) - 1)] - SKIN_TONES[lo])
    hair = HAIR_COLOURS[rng.integers(len(HAIR_COLOURS))] * rng.uniform(0.85, 1.15)
    male_like = rng.random() < 0.5
    subject = Subject(
        seed=seed,
        identity=identity,
        skin=skin * rng.uniform(0.95, 1.05, 3),
        hair=np.clip(hair, 0, 1),
        lips=np.clip(skin * np.array([0.95, 0.62, 0.62]) * rng.uniform(0.8, 1.05), 0, 1),
        iris=IRIS_COLOURS[rng.integers(len(IRIS_COLOURS))] * rng.uniform(0.8, 1.2),
        brow_thickness=float(rng.uniform(0.2, 1.0)),
        freckles=float(rng.uniform(0, 1) if rng.random() < 0.25 else 0.0),
        beard=float(rng.choice([0.0, 0.3, 1.0], p=[0.3, 0.4, 0.3]) if male_like else 0.0),
        hair_coverage=float(rng.uniform(0.6, 1.0) if rng.random() > 0.08 else 0.0),
        clothing=rng.uniform(0.05, 0.8, 3),
        light_direction=_unit(np.array([rng.uniform(-0.7, 0.7), rng.uniform(-0.8, 0.1), -1.0])),
        light_colour=np.array([1.0, rng.uniform(0.9, 1.0), rng.uniform(0.8, 1.0)]) * rng.uniform(0.55, 0.8),
        ambient=np.full(3, rng.uniform(0.35, 0.55)),
        background=(rng.uniform(0.1, 0.9, 3), rng.uniform(0.05, 0.7, 3)),
    )
    subject.texture = build_texture(subject, rig, rng)
    return subject


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


# ----------------------------------------------------------------------------- texture atlas


@lru_cache(maxsize=2)
def _face_regions(rig: FaceRig) -> dict[str, np.ndarray]:
    """Soft masks (512, 512) in the face texture for lips, brows, beard area and cheeks."""
    size = 512
    u0, v0, u1, v1 = rig.atlas["face"]
    uv = np.zeros((rig.num_landmarks, 2))
    face_faces = rig.face_part == rig.part_names.index("face")
    for corner in range(3):
        ids = rig.faces[face_faces, corner]
        uv[ids] = rig.face_uvs[face_faces, corner]
    px = (uv - [u0, v0]) / [u1 - u0, v1 - v0] * size

    def polygon(ids, blur):
        im = Image.new("L", (size, size), 0)
        ImageDraw.Draw(im).polygon([tuple(px[i]) for i in ids], fill=255)
        return np.asarray(im.filter(ImageFilter.GaussianBlur(blur)), np.float32) / 255

    lips = list(rig.lips_outline)
    oval = list(rig.face_oval)
    mouth_y = px[list(rig.mouth_loop), 1].mean()
    nose_y = px[2, 1]
    jaw = [i for i in oval if px[i, 1] > nose_y]
    regions = {
        "lips": polygon(lips, 2),
        "beard": np.clip(polygon(jaw + [2], 6) - polygon(lips, 3) * 1.2, 0, 1),
        "cheeks": np.clip(polygon([i for i in oval if abs(px[i, 1] - mouth_y) < 120], 25), 0, 1),
        "oval": polygon(oval, 3),
        # 1 well inside the face oval, fading to 0 over its outer ~20 px: the photo's own edge
        # (ears, hair, background) is replaced by skin that meets the head shell without a seam.
        "inner": np.asarray(Image.fromarray((polygon(oval, 0) * 255).astype(np.uint8))
                            .filter(ImageFilter.MinFilter(21)).filter(ImageFilter.GaussianBlur(7)), np.float32) / 255,
        "brow_left": polygon(list(rig.brow_outlines[0]), 1.5),
        "brow_right": polygon(list(rig.brow_outlines[1]), 1.5),
    }
    return regions


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Smooth noise with unit standard deviation."""
    n = gaussian_filter(rng.standard_normal(shape), sigma)
    return (n / (n.std() + 1e-8)).astype(np.float32)


def build_texture(subject: Subject, rig: FaceRig, rng: np.random.Generator) -> np.ndarray:
    """The subject's texture atlas, (ATLAS_SIZE, ATLAS_SIZE, 3) float32 in [0, 1]."""
    atlas = np.zeros((ATLAS_SIZE, ATLAS_SIZE, 3), np.float32)

    def box(part: str) -> tuple[slice, slice]:
        u0, v0, u1, v1 = rig.atlas[part]
        return slice(int(v0 * ATLAS_SIZE), int(v1 * ATLAS_SIZE)), slice(int(u0 * ATLAS_SIZE), int(u1 * ATLAS_SIZE))

    regions = _face_regions(rig)
    photo = face_texture().astype(np.float32) / 255
    skin_ref = np.median(photo[regions["cheeks"] > 0.5], axis=0)
    face = photo * (subject.skin / skin_ref)  # colour transfer keeps the photo's detail
    luminance = photo.mean(-1, keepdims=True) / skin_ref.mean()
    lips = regions["lips"][..., None]
    face = face * (1 - lips) + lips * subject.lips * luminance ** 1.2
    brows = np.clip(regions["brow_left"] + regions["brow_right"], 0, 1)
    brow_mask = np.asarray(
        Image.fromarray((brows * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1 + 4 * subject.brow_thickness)),
        np.float32,
    ) / 255
    brow_mask = np.clip(brow_mask * (1.5 + subject.brow_thickness), 0, 1)[..., None]
    brow_colour = np.minimum(subject.hair, subject.skin * 0.5)
    hairs = gaussian_filter(rng.standard_normal(face.shape[:2]), (0.5, 1.5))  # short, mostly sideways hairs
    hairs = np.clip(0.75 + 0.5 * hairs / (hairs.std() + 1e-8), 0.2, 1.3)[..., None]
    alpha = 0.8 * brow_mask * np.clip(hairs, 0, 1)
    face = face * (1 - alpha) + alpha * brow_colour * hairs
    if subject.freckles > 0:
        spots = (rng.random(face.shape[:2]) < 0.004 * subject.freckles).astype(np.float32)
        spots = np.asarray(Image.fromarray((spots * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.2)), np.float32)
        spots = np.clip(spots / 40, 0, 1) * regions["cheeks"]
        face *= 1 - 0.35 * spots[..., None]
    if subject.beard > 0:
        hairs = np.clip(_noise(rng, face.shape[:2], 0.7) * 0.5 + 0.5, 0, 1)
        density = regions["beard"] * (0.35 if subject.beard < 0.5 else 0.9)
        stubble = (density * hairs)[..., None]
        face = face * (1 - stubble) + stubble * subject.hair * 0.8
    face *= 1 + 0.03 * _noise(rng, face.shape[:2], 1.0)[..., None]  # pores
    edge_skin = np.median(face[regions["cheeks"] > 0.5], axis=0)
    inner = regions["inner"][..., None]
    face = face * inner + (1 - inner) * edge_skin
    atlas[box("face")] = _resize(np.clip(face, 0, 1), box("face"))

    # Head shell: u goes round the face oval from the forehead, v from the oval to the back.
    rows, cols = _shape(box("head"))
    v, u = np.mgrid[0:rows, 0:cols].astype(np.float32)
    u /= cols
    v /= rows
    shell = np.broadcast_to(edge_skin, (rows, cols, 3)).copy()
    # Hairline: low at the forehead (u ~ 0 or 1), higher over the temples, none under the chin.
    side = np.minimum(u, 1 - u)  # 0 at the forehead, 0.5 at the chin
    hairline = 0.01 + 0.3 * np.clip(side / 0.25, 0, 1) ** 2 + 0.3 * (1 - subject.hair_coverage)
    hair_mask = (v > hairline) & (side < 0.36 + 0.08 * subject.hair_coverage) & (subject.hair_coverage > 0)
    hair_mask = np.asarray(Image.fromarray((hair_mask * 255).astype(np.uint8)).filter(ImageFilter.GaussianBlur(3)), np.float32) / 255
    fine = gaussian_filter(rng.standard_normal((rows, cols)), (2.5, 0.6))  # strands run from the face back
    strands = 0.8 + 0.12 * np.clip(fine / (fine.std() + 1e-8) + 0.7 * _noise(rng, (rows, cols), 12.0), -2.5, 2.5)
    hair_rgb = subject.hair * strands[..., None]
    shell = shell * (1 - hair_mask[..., None]) + hair_mask[..., None] * hair_rgb
    atlas[box("head")] = np.clip(shell, 0, 1)

    rows, cols = _shape(box("neck"))
    vv = np.linspace(0, 1, rows)[:, None, None]
    neck = np.broadcast_to(edge_skin * 0.92, (rows, cols, 3)).copy()
    collar = (vv > 0.55).astype(np.float32)
    atlas[box("neck")] = neck * (1 - collar) + collar * subject.clothing

    atlas[box("eyeball")] = _eyeball(subject, _shape(box("eyeball")), rng)
    for part, gum_top in (("upper_teeth", True), ("lower_teeth", False)):
        atlas[box(part)] = _teeth(_shape(box(part)), gum_top)
    rows, cols = _shape(box("tongue"))
    atlas[box("tongue")] = np.array([0.75, 0.35, 0.38]) * (0.9 + 0.1 * _noise(rng, (rows, cols), 2))[..., None]
    rows, cols = _shape(box("cavity"))
    yy, xx = np.mgrid[0:rows, 0:cols] / rows - 0.5
    depth = np.clip(1 - 2 * np.hypot(xx, yy), 0, 1)[..., None]
    atlas[box("cavity")] = np.array([0.35, 0.08, 0.1]) * (1 - 0.8 * depth)
    return np.clip(atlas, 0, 1)


def _shape(sl: tuple[slice, slice]) -> tuple[int, int]:
    return sl[0].stop - sl[0].start, sl[1].stop - sl[1].start


def _resize(image: np.ndarray, sl: tuple[slice, slice]) -> np.ndarray:
    rows, cols = _shape(sl)
    if image.shape[:2] == (rows, cols):
        return image
    return np.asarray(Image.fromarray((image * 255).astype(np.uint8)).resize((cols, rows), Image.LANCZOS), np.float32) / 255


def _eyeball(subject: Subject, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Sclera with an iris and pupil, in the eyeball's orthographic UV (iris radius 0.184 of the patch)."""
    rows, cols = shape
    yy, xx = (np.mgrid[0:rows, 0:cols] + 0.5) / rows - 0.5
    r = np.hypot(xx, yy)
    angle = np.arctan2(yy, xx)
    sclera = np.array([0.93, 0.90, 0.88]) * (1 - 0.25 * np.clip((r - 0.25) / 0.25, 0, 1))[..., None]
    streaks = 0.8 + 0.2 * np.sin(angle * 40 + 3 * _noise(rng, (rows, cols), 3))
    iris_r, pupil_r = 0.184, 0.07
    iris = subject.iris * streaks[..., None] * (1 - 0.5 * np.clip((r - 0.15) / 0.034, 0, 1))[..., None]
    out = np.where((r < iris_r)[..., None], iris, sclera)
    out = np.where((r < pupil_r)[..., None], 0.03, out)
    highlight = np.exp(-((xx + 0.05) ** 2 + (yy + 0.06) ** 2) / 0.0004)[..., None]
    return np.clip(out + 0.6 * highlight, 0, 1)


def _teeth(shape: tuple[int, int], gum_top: bool) -> np.ndarray:
    rows, cols = shape
    u = (np.arange(cols) + 0.5) / cols
    v = (np.arange(rows) + 0.5) / rows
    n_teeth = 14
    gap = 1 - 0.35 * np.exp(-((np.mod(u * n_teeth, 1.0) - 0.0) ** 2) / 0.004) - 0.35 * np.exp(-((np.mod(u * n_teeth, 1.0) - 1.0) ** 2) / 0.004)
    sides = 1 - 0.5 * np.abs(u - 0.5) * 2  # back teeth are in shadow
    teeth = np.array([0.95, 0.93, 0.86])[None, None] * (gap * sides)[None, :, None] * np.ones((rows, 1, 1))
    gum_v = v < 0.3 if gum_top else v > 0.7
    teeth[gum_v] = np.array([0.75, 0.4, 0.42])
    return teeth.astype(np.float32)
