"""Appearance cue: a small CNN that reads expression coefficients from the pixels of the face.

Why: several blendshapes barely move MediaPipe's landmarks (eye wide, nose sneer, brow lowering,
upper-lip raise, mouth press; see :mod:`liftavatar.face.fit`), so a landmark fit leaves them near 0
whatever its prior. They do change the image (wrinkles, sclera, shading, lip shape), as
image-encoder trackers (DECA, EMOCA, SMIRK) exploit. This module turns each frame into a
pose-normalised face crop and predicts all E coefficients from it; :func:`liftavatar.face.fit.fit_rig`
then uses the prediction as a soft Gaussian prior on ψ, per blendshape as strong as the network is
reliable on validation clips (``precision``, stored with the weights).

Crop: a similarity transform (scale, rotation, translation; least squares over the FaceMesh
landmarks that expressions move least) maps the detected landmarks onto the rig template's frontal
outline, so the face sits upright at a fixed size in a ``CROP``² RGB image whatever the input's
resolution, framing or roll (large shrinks go through an area-averaging pyramid first, against
aliasing). Yaw and pitch remain; the network learns them. Each crop is standardised per channel
inside the network, which absorbs exposure and skin tone.

Weights: ``face/data/appearance.safetensors`` (no pickle), made by ``scripts/train_appearance.py``
from synthetic renders with known kinematics (seeds in that script's docstring). The file carries,
besides the network, the alignment landmark ids and their canonical crop positions, the expression
names it was trained for and the per-blendshape prior precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from liftavatar.errors import LiftAvatarError
from liftavatar.face.rig import DATA, FaceRig

APPEARANCE_FILE = "appearance.safetensors"
CROP = 96  # side of the network's input crop, pixels (the packaged network's; the file records its own)
MARGIN = 4  # training crops are cut MARGIN px larger on each side, for random shifts
FACE_HEIGHT = 0.84  # forehead-to-chin extent of the template as a fraction of the crop side
NUM_ALIGN = 100  # landmarks used for the similarity alignment


def alignment_frame(rig: FaceRig, count: int = NUM_ALIGN, crop: int = CROP) -> tuple[np.ndarray, np.ndarray]:
    """(ids (count,), canonical (count, 2)): the surface landmarks that the rig's expressions move
    least (face oval excluded) and where they sit in a ``crop``² crop of the frontal template
    (pixels, top-left corner at (0, 0)), symmetric about the crop's vertical midline."""
    basis = rig.expression_basis[:, :468]
    reach = np.abs(basis).max(axis=(0, 2))
    reach[rig.face_oval] = np.inf
    ids = np.sort(np.argsort(reach, kind="stable")[:count])
    surface = rig.template[:468, :2].astype(np.float64)
    top, bottom = surface[:, 1].min(), surface[:, 1].max()
    scale = FACE_HEIGHT * crop / (bottom - top)
    centre = np.array([0.0, 0.5 * (top + bottom)])  # the template's x = 0 is its midline
    canonical = (surface[ids] - centre) * scale + crop / 2
    return ids.astype(np.int64), canonical.astype(np.float32)


def similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """(2, 3) least-squares similarity transform taking points ``src`` (K, 2) onto ``dst`` (K, 2)
    (Umeyama's estimate, through scikit-image)."""
    from skimage.transform import SimilarityTransform

    return SimilarityTransform.from_estimate(np.asarray(src, np.float64), np.asarray(dst, np.float64)).params[:2]


def face_crop(image: np.ndarray, landmarks: np.ndarray, ids: np.ndarray, canonical: np.ndarray,
              margin: int = 0, crop: int = CROP) -> np.ndarray:
    """The pose-normalised (crop + 2·margin)² RGB uint8 crop of ``image`` (H, W, 3) uint8 whose face
    has FaceMesh ``landmarks`` (478, 2) in its pixels (top-left corner at (0, 0)); ``canonical``
    from :func:`alignment_frame` for the same ``crop``."""
    import cv2

    m = similarity(landmarks[ids], canonical + margin)
    scale = float(np.sqrt(abs(np.linalg.det(m[:, :2]))))
    image = np.ascontiguousarray(image[..., :3])
    level = 1.0
    while scale * level < 0.6 and min(image.shape[:2]) > 32:  # area-average before shrinking a lot
        image = cv2.pyrDown(image)
        level *= 2.0
    # Corner-origin coordinates u map to m·u; in the pyramid level, u = level · u'. OpenCV warps
    # pixel centres, hence the half-pixel shifts.
    lin = m[:, :2] * level
    shift = m[:, 2] + lin @ np.full(2, 0.5) - 0.5
    warp = np.concatenate([lin, shift[:, None]], 1)
    side = crop + 2 * margin
    return cv2.warpAffine(image, warp, (side, side), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


class AppearanceNet(nn.Module):
    """(B, 3, S, S) float [0, 1] crops -> (B, E) coefficients in [0, 1] (S = 96 or 128: the features
    are pooled to 6 × 6 before the head)."""

    def __init__(self, num_expressions: int, width: int = 24):
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *block(3, w, 2),  # 48
            *block(w, 2 * w, 2),  # 24
            *block(2 * w, 2 * w, 1),
            *block(2 * w, 3 * w, 2),  # 12
            *block(3 * w, 4 * w, 2),  # 6 (96²) or 8 (128²)
            nn.AdaptiveAvgPool2d(6),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w * 36, 192), nn.ReLU(inplace=True),
                                  nn.Linear(192, num_expressions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True).clamp_min(0.02)
        return torch.sigmoid(self.head(self.features((x - mean) / std)))


@dataclass
class AppearanceModel:
    """The packaged appearance network with what the tracker needs to use it."""

    net: AppearanceNet
    expression_names: list[str]
    align_ids: np.ndarray  # (K,) landmark ids for the crop's similarity alignment
    canonical: np.ndarray  # (K, 2) their crop positions, pixels
    precision: np.ndarray  # (E,) prior weight per blendshape, reference px² per unit² of coefficient
    crop_size: int = CROP  # side of the network's input crops, pixels

    @classmethod
    def load(cls, path: str | Path | None = None) -> "AppearanceModel":
        """Load ``path`` (default: the packaged ``face/data/appearance.safetensors``)."""
        from safetensors import safe_open

        path = Path(path) if path is not None else Path(str(DATA / APPEARANCE_FILE))
        if not path.is_file():
            raise LiftAvatarError(f"{path}: no appearance weights there; run scripts/train_appearance.py to make them.")
        with safe_open(str(path), "pt") as f:
            names = (f.metadata() or {}).get("expression_names", "").split(",")
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        num = int(tensors["precision"].shape[0])
        width = int(tensors["net.features.0.weight"].shape[0])
        net = AppearanceNet(num, width)
        net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        net.eval()
        side = int(tensors["crop_size"]) if "crop_size" in tensors else 96
        return cls(net, names, tensors["align_ids"].numpy().astype(np.int64), tensors["canonical"].numpy(),
                   tensors["precision"].numpy().astype(np.float64), side)

    @classmethod
    def default(cls, rig: FaceRig) -> "AppearanceModel | None":
        """The packaged model if there is one and it was trained for ``rig``'s blendshapes, else None."""
        path = Path(str(DATA / APPEARANCE_FILE))
        if not path.is_file():
            return None
        model = cls.load(path)
        return model if model.expression_names == list(rig.expression_names) else None

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        tensors = {f"net.{k}": v.detach().contiguous() for k, v in self.net.state_dict().items()}
        tensors["align_ids"] = torch.as_tensor(self.align_ids, dtype=torch.int64)
        tensors["canonical"] = torch.as_tensor(self.canonical, dtype=torch.float32)
        tensors["precision"] = torch.as_tensor(self.precision, dtype=torch.float32)
        tensors["crop_size"] = torch.tensor(self.crop_size, dtype=torch.int64)
        save_file(tensors, str(path), metadata={"expression_names": ",".join(self.expression_names)})

    def crop(self, image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
        """(S, S, 3) uint8 pose-normalised crop of one frame (see :func:`face_crop`)."""
        return face_crop(image, landmarks, self.align_ids, self.canonical, crop=self.crop_size)

    @torch.no_grad()
    def predict(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """(N, E) float32 coefficients in [0, 1] from (N, S, S, 3) uint8 crops (S = ``crop_size``; batched)."""
        crops = np.asarray(crops)
        side = self.crop_size
        if crops.ndim != 4 or crops.shape[1:] != (side, side, 3):
            raise LiftAvatarError(f"crops {crops.shape} must be shaped (N, {side}, {side}, 3); "
                                  "make them with AppearanceModel.crop.")
        out = np.zeros((len(crops), len(self.expression_names)), np.float32)
        for start in range(0, len(crops), batch_size):
            x = torch.from_numpy(crops[start:start + batch_size]).permute(0, 3, 1, 2).float() / 255.0
            out[start:start + batch_size] = self.net(x).numpy()
        return out
