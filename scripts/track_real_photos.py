#!/usr/bin/env python
"""Track the real face photos that ship with registry packages; write the preview under docs/.

    python scripts/track_real_photos.py [--out docs/tracking_real_photos.png]

Each photo (scikit-image's astronaut, matplotlib's Grace Hopper) becomes a folder of five views of
the same person (liftavatar.face.photos), which `track` fits as one subject. The picture shows,
per person, the views, the fitted mesh over them and the shading maps.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

from liftavatar.face.photos import real_photos, write_photo_folder
from liftavatar.face.track import TrackConfig, track
from liftavatar.report import tracking_contact_sheet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "docs" / "tracking_real_photos.png")
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    sheets = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in real_photos():
            folder = write_photo_folder(name, Path(tmp) / name)
            capture, report = track(folder, Path(tmp) / f"{name}_capture", TrackConfig(size=args.size), progress=False)
            print(f"{name}: {report.summary()}")
            sheets.append(np.asarray(Image.open(tracking_contact_sheet(capture, Path(tmp) / f"{name}.png"))))
    width = max(s.shape[1] for s in sheets)
    sheet = np.concatenate([np.pad(s, ((0, 6), (0, width - s.shape[1]), (0, 0))) for s in sheets])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(sheet).save(args.out, optimize=True)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
