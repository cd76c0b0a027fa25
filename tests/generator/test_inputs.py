"""Generation inputs from Captures: resizing to and from the prior's resolution, square captures only."""

import numpy as np
import pytest
import torch

from liftavatar.capture import Capture, write_capture
from liftavatar.errors import ConfigError
from liftavatar.generator.inputs import image_tensor, resize_images, square_side


def test_shrinking_averages_every_pixel_and_enlarging_stays_in_range():
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert resize_images(images, 8) is images
    half = resize_images(images, (4, 4))
    torch.testing.assert_close(half, images.unflatten(2, (4, 2)).unflatten(4, (4, 2)).mean(dim=(3, 5)))
    # a one-pixel line is not lost when shrinking (it would be, sampling every other pixel)
    line = torch.zeros(1, 1, 8, 8)
    line[..., 3] = 1.0
    assert resize_images(line, 4).sum() == pytest.approx(line.sum() / 4)
    big = resize_images(images, 20)
    assert big.shape == (2, 3, 20, 20) and 0 <= big.min() and big.max() <= 1
    flat = torch.full((1, 3, 8, 8), 0.25)
    torch.testing.assert_close(resize_images(flat, 20), torch.full((1, 3, 20, 20), 0.25))


def test_image_tensor_is_channels_first_in_unit_range():
    array = np.arange(2 * 4 * 4 * 3, dtype=np.uint8).reshape(2, 4, 4, 3)
    tensor = image_tensor(array)
    assert tensor.shape == (2, 3, 4, 4) and tensor[1, 2, 3, 0] == pytest.approx(array[1, 3, 0, 2] / 255)
    assert image_tensor(array[..., 0]).shape == (2, 1, 4, 4)


def test_a_capture_that_is_not_square_is_named(tmp_path, tiny_capture):
    assert square_side(tiny_capture, "lift") == tiny_capture.size[0]
    from dataclasses import replace

    h = tiny_capture.size[0]
    crop = lambda images: images[:, :, : h - 8]  # noqa: E731
    wide = write_capture(tmp_path / "wide", replace(tiny_capture.meta, size=(h, h - 8)), tiny_capture.kinematics,
                         crop(tiny_capture.frames()), crop(tiny_capture.masks()), crop(tiny_capture.shadings()))
    with pytest.raises(ConfigError, match=f"{tmp_path / 'wide'}: its frames are {h}x{h - 8}.*not square"):
        square_side(Capture.load(wide.path), "lift")
