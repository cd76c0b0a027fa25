"""LPIPS and FID: skipped with a clear message without their standard weights; with weight files of
the standard layout they load and behave as the metrics must. The Fréchet distance is checked by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from liftavatar.metrics import EvalConfig, FrameSet, MetricsError, MissingWeightsError, evaluate
from liftavatar.metrics.fid import FIDInception, activation_statistics, fid, frechet_distance
from liftavatar.metrics.lpips import LPIPS, lpips
from liftavatar.metrics.weights import FID_ENV, LPIPS_ENV, find_fid_weights, find_lpips_weights


@pytest.fixture(autouse=True)
def no_weights_anywhere(monkeypatch, tmp_path):
    """Whatever this machine has cached, the tests see an empty torch hub and no variables."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv(LPIPS_ENV, raising=False)
    monkeypatch.delenv(FID_ENV, raising=False)
    monkeypatch.setattr("liftavatar.metrics.weights._lpips_package_heads", lambda: None)


def frames(n: int = 3, size: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def write_lpips_files(folder) -> None:
    """Random weights under the standard names and keys: torchvision AlexNet, LPIPS v0.1 heads."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = LPIPS()
    trunk = {f"features.{k}": v for k, v in model.features.state_dict().items()}
    trunk["classifier.6.bias"] = torch.zeros(1000)  # torchvision's file has the classifier too
    torch.save(trunk, folder / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate((64, 192, 384, 256, 256))},
               folder / "alex.pth")


def test_absent_weights_are_reported_and_skipped_not_substituted():
    with pytest.raises(MissingWeightsError, match=f"LPIPS skipped: .*alexnet-owt-7be5be79.pth.*{LPIPS_ENV}"):
        find_lpips_weights()
    with pytest.raises(MissingWeightsError, match=f"FID skipped: .*pt_inception-2015-12-05-6726825d.pth.*{FID_ENV}"):
        find_fid_weights()
    a, b = frames(seed=1), frames(seed=2)
    report = evaluate(FrameSet(None, "array", a), FrameSet(None, "array", b),
                      EvalConfig(metrics=("psnr", "lpips", "fid")))
    assert report["metrics"]["lpips"] == {"skipped": str(pytest.raises(MissingWeightsError, find_lpips_weights).value)}
    assert report["metrics"]["fid"]["skipped"].startswith("FID skipped:")
    assert "value" not in report["metrics"]["lpips"] and "value" not in report["metrics"]["fid"]
    assert report["metrics"]["psnr"]["value"] < 15


def test_a_wrong_option_path_is_named(tmp_path):
    with pytest.raises(MissingWeightsError, match="--lpips-weights .*nowhere"):
        find_lpips_weights(tmp_path / "nowhere")


def test_lpips_with_weights_of_the_standard_layout(tmp_path, monkeypatch):
    write_lpips_files(tmp_path / "w")
    a, b = frames(2, 64, seed=3), frames(2, 64, seed=4)
    d_ab = lpips(a, b, weights=tmp_path / "w")
    assert d_ab.shape == (2,) and (d_ab > 0).all()
    np.testing.assert_allclose(lpips(b, a, weights=tmp_path / "w"), d_ab, rtol=1e-5)  # symmetric
    np.testing.assert_allclose(lpips(a, a, weights=tmp_path / "w"), 0.0, atol=1e-7)
    # Masked: differences only outside the mask cost nothing.
    mask = np.zeros((2, 64, 64), np.uint8)
    mask[:, 16:48, 16:48] = 255
    c = a.copy()
    c[:, :8] = 255 - c[:, :8]
    np.testing.assert_allclose(lpips(c, a, mask, weights=tmp_path / "w"), 0.0, atol=1e-7)
    assert (lpips(c, a, weights=tmp_path / "w") > 0).all()
    # Found through the environment variable as well, and reported by evaluate.
    monkeypatch.setenv(LPIPS_ENV, str(tmp_path / "w"))
    report = evaluate(FrameSet(None, "array", a), FrameSet(None, "array", b), EvalConfig(metrics=("lpips",)))
    assert report["metrics"]["lpips"]["value"] == pytest.approx(d_ab.mean(), rel=1e-5)


def test_lpips_refuses_a_file_of_another_network(tmp_path):
    write_lpips_files(tmp_path / "w")
    trunk = torch.load(tmp_path / "w" / "alexnet-owt-7be5be79.pth", weights_only=True)
    del trunk["features.10.weight"]
    torch.save(trunk, tmp_path / "w" / "alexnet-owt-7be5be79.pth")
    with pytest.raises(MetricsError, match="not torchvision's AlexNet"):
        lpips(frames(1), frames(1), weights=tmp_path / "w")


def test_frechet_distance_by_hand():
    # 1-D: |0 − 3|² + 1 + 4 − 2·sqrt(1·4) = 9 + 5 − 4 = 10
    assert frechet_distance([0.0], [[1.0]], [3.0], [[4.0]]) == pytest.approx(10.0)
    # Diagonal: Σ (μ1 − μ2)² + Σ (σ1 + σ2 − 2 sqrt(σ1 σ2))
    mu1, mu2 = np.array([1.0, 2.0, 0.0]), np.array([1.0, 0.0, 1.0])
    s1, s2 = np.diag([1.0, 9.0, 4.0]), np.diag([4.0, 1.0, 4.0])
    expected = (0 + 4 + 1) + (1 + 4 - 4) + (9 + 1 - 6) + (4 + 4 - 8)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 4))
    assert frechet_distance(*activation_statistics(a), *activation_statistics(a)) == pytest.approx(0.0, abs=1e-6)


class MeanColour(torch.nn.Module):
    """A 3-d stand-in feature network (mean RGB) to check fid()'s plumbing by hand."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_fid_of_sets_that_differ_by_a_shift():
    rng = np.random.default_rng(5)
    colours = rng.uniform(0.2, 0.7, (6, 3))
    a = np.broadcast_to(colours[:, None, None, :], (6, 8, 8, 3)).astype(np.float32)
    b = a + np.float32(0.1)  # same covariance, mean shifted by 0.1 in each channel
    assert fid(a, b, weights=MeanColour()) == pytest.approx(3 * 0.1**2, abs=1e-6)
    assert fid(a, a, weights=MeanColour()) == pytest.approx(0.0, abs=1e-9)


def test_fid_inception_loads_the_standard_layout_and_gives_2048_features(tmp_path):
    torch.manual_seed(0)
    state = FIDInception().state_dict()
    assert sum(v.numel() for k, v in state.items() if k.endswith(("weight", "bias")) and ".bn." not in k) + sum(
        v.numel() for k, v in state.items() if k.endswith((".bn.weight", ".bn.bias"))) == 21_785_568
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}  # as in pytorch-fid's file
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    path = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, path)
    model = FIDInception.from_file(find_fid_weights(tmp_path))
    out = model(torch.rand(1, 3, 32, 32))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()
    del state["Mixed_7c.branch_pool.conv.weight"]
    torch.save(state, path)
    with pytest.raises(MetricsError, match="lacks Mixed_7c.branch_pool.conv.weight"):
        FIDInception.from_file(path)
