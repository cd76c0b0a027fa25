import pytest
import torch

from liftavatar.errors import ConfigError
from liftavatar.generator.codec import PixelCodec, WanVAECodec, frame_groups


def test_pixel_codec_round_trips_exactly():
    codec = PixelCodec(4)
    video = torch.rand(2, 3, 5, 32, 48)
    latents = codec.encode(video)
    assert latents.shape == (2, 48, 5, 8, 12)
    assert latents.min() >= -1 and latents.max() <= 1
    torch.testing.assert_close(codec.decode(latents), video, rtol=0, atol=1e-6)
    assert codec.encode_frames(video).shape == latents.shape
    with pytest.raises(ConfigError, match="divisible by 4"):
        codec.encode(torch.rand(1, 3, 1, 30, 32))


def _tiny_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)


def test_wan_vae_codec_shapes_and_reference_frames(tmp_path):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    codec = WanVAECodec.from_pretrained(tmp_path / "vae")
    assert (codec.latent_channels, codec.spatial_factor, codec.temporal_factor) == (4, 8, 4)
    video = torch.rand(1, 3, 9, 32, 32)
    latents = codec.encode(video)
    assert latents.shape == (1, 4, 3, 4, 4)  # 4n + 1 frames → n + 1 latent frames, 8× smaller
    assert codec.decode(latents).shape == video.shape
    refs = codec.encode_frames(torch.rand(1, 3, 5, 32, 32))
    assert refs.shape == (1, 4, 5, 4, 4)  # each reference is its own one-frame clip
    with torch.no_grad():
        single = codec.encode(video[:, :, 2:3])
    torch.testing.assert_close(codec.encode_frames(video[:, :, 2:3]), single)
    with pytest.raises(ConfigError, match="4n \\+ 1"):
        codec.encode(torch.rand(1, 3, 8, 32, 32))
    with pytest.raises(ConfigError, match="AutoencoderKLWan"):
        WanVAECodec.from_pretrained(tmp_path)


def test_frame_groups():
    assert frame_groups(9, 4) == [[0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert frame_groups(3, 1) == [[0], [1], [2]]
