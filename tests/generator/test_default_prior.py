"""The embedded prior ships with the package and is what `lift`, `generate` and `demo` use by default."""

import json

import torch

from liftavatar.generator.pipeline import GenerationInputs, LiftAvatarPipeline
from liftavatar.generator.prior import DEFAULT_PRIOR, resolve_prior

# Every seed range an evaluation, test or demo draws its subjects from (see the model card).
EVALUATION_SEEDS = [(1000, 1100), (5000, 6000), (6000, 8000), (9000, 10000), (900000, 900100)]


def test_embedded_prior_is_the_default_and_fits_the_budget():
    assert resolve_prior(None) == DEFAULT_PRIOR
    shards = sorted(DEFAULT_PRIOR.glob("model-*.safetensors"))
    assert shards and sum(p.stat().st_size for p in shards) <= 50 * 2**20
    for name in ("config.json", "README.md", "training_curve.png", "history.json"):
        assert (DEFAULT_PRIOR / name).is_file(), name
    extra = json.loads((DEFAULT_PRIOR / "config.json").read_text())["extra"]
    lo, hi = extra["seed_range"]
    assert all(hi <= a or lo >= b for a, b in EVALUATION_SEEDS), "training seeds overlap an evaluation range"
    assert extra["size"] == 128 and extra["refs"] == 5


def test_embedded_prior_generates_frames_of_its_size():
    pipe = LiftAvatarPipeline.from_pretrained(resolve_prior(None))
    g = torch.Generator().manual_seed(0)
    d = pipe.model.config.num_controls
    inputs = GenerationInputs(ref_frames=torch.rand(5, 3, 128, 128, generator=g),
                              ref_shading=torch.rand(5, 3, 128, 128, generator=g),
                              ref_controls=torch.rand(5, d, generator=g), shading=torch.rand(4, 3, 128, 128, generator=g),
                              controls=torch.rand(4, d, generator=g))
    video = pipe(inputs, steps=1, solver="euler")
    assert video.shape == (4, 3, 128, 128) and torch.isfinite(video).all()
