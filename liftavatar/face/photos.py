"""Real face photos that ship with registry packages, as small image folders for the tracker.

scikit-image's ``astronaut.png`` (Eileen Collins) and matplotlib's ``grace_hopper.jpg``: each
becomes a folder of a few same-sized views of one person (the photo, mirrored, turned a little,
zoomed), so that one identity is fitted from several frames as in a video.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def real_photos() -> dict[str, np.ndarray]:
    """name -> RGB uint8 photo."""
    import matplotlib
    import skimage.data

    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    with Image.open(hopper) as im:
        grace = np.asarray(im.convert("RGB"))
    return {"astronaut": skimage.data.astronaut(), "grace_hopper": grace}


def photo_views(photo: np.ndarray) -> list[np.ndarray]:
    """The photo, mirrored, turned by ±8° and zoomed 1.15× about its centre: same size each."""
    image = Image.fromarray(photo)
    w, h = image.size
    zoom = image.crop((w * 0.065, h * 0.065, w * 0.935, h * 0.935)).resize((w, h), Image.BICUBIC)
    views = [image, image.transpose(Image.FLIP_LEFT_RIGHT), image.rotate(8, Image.BICUBIC),
             image.rotate(-8, Image.BICUBIC), zoom]
    return [np.asarray(v) for v in views]


def write_photo_folder(name: str, folder: str | Path) -> Path:
    """Write the views of photo ``name`` as ``folder/000.png``…; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, view in enumerate(photo_views(real_photos()[name])):
        Image.fromarray(view).save(folder / f"{i:03d}.png")
    return folder
