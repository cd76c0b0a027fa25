#!/usr/bin/env python
"""Real shapes on a GPU: the `wan2.1-1.3b` preset (random weights) at 512², 17 frames + 5 references.

    python benchmarks/generator_shapes.py [--preset wan2.1-1.3b] [--size 512] [--frames 17] [--refs 5]

Builds the LiftAvatar transformer on the Wan2.1-T2V-1.3B configuration and the Wan VAE architecture
(both randomly initialised: real weights cannot be downloaded here), adds LoRA (rank 32) and runs,
in bf16 with gradient checkpointing:

- the VAE encode of one clip (17 target frames + their shading maps, 5 references + theirs),
- one LoRA training step (flow-matching loss, backward, AdamW step) on those latents,
- one sampling step (a guided Euler step: two transformer passes) and the VAE decode.

Times are medians over a few repeats after a warm-up; peak memory is ``torch.cuda.max_memory_allocated``
per phase. Writes benchmarks/results/generator_shapes.json with the device named.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from liftavatar.generator.codec import WanVAECodec
from liftavatar.generator.pipeline import make_scheduler
from liftavatar.generator.train import TrainConfig, sample_sigmas
from liftavatar.generator.transformer import LiftAvatarTransformer, group_controls
from liftavatar.report import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
D = 43


def timed(fn, repeats: int) -> tuple[float, float, object]:
    """(median seconds, peak GiB, last result) of ``fn`` after one warm-up call."""
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    out = fn()
    sync()
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), (torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="wan2.1-1.3b")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--refs", type=int, default=5)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda", help="cpu only for a dry run of the script at tiny shapes")
    parser.add_argument("--out", type=Path, default=RESULTS / "generator_shapes.json")
    args = parser.parse_args()
    from diffusers import AutoencoderKLWan

    device, dtype = torch.device(args.device), torch.bfloat16
    torch.manual_seed(0)
    codec = WanVAECodec(AutoencoderKLWan()).to(device, dtype)  # Wan2.1 VAE architecture, random weights
    c = codec.latent_channels
    model = LiftAvatarTransformer.from_preset(args.preset, D, "both", in_channels=c, out_channels=c)
    model.add_lora(args.rank)
    model.enable_gradient_checkpointing()
    model.to(device, dtype)
    params = model.num_parameters()
    trainable = [p for p in model.parameters() if p.requires_grad]
    # LoRA and the new modules train in fp32 master weights (bf16 compute through autocast below)
    for p in trainable:
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    s, f, k = args.size, args.frames, args.refs
    video = torch.rand(1, 3, f, s, s, device=device)
    shading_video = torch.rand(1, 3, f, s, s, device=device)
    refs = torch.rand(1, 3, k, s, s, device=device)
    ref_shading_video = torch.rand(1, 3, k, s, s, device=device)
    controls = group_controls(torch.randn(1, f, D, device=device), codec.temporal_factor)
    ref_controls = group_controls(torch.randn(1, k, D, device=device), 1).expand(-1, -1, codec.temporal_factor, -1)

    @torch.no_grad()
    def encode():
        return (codec.encode(video), codec.encode(shading_video), codec.encode_frames(refs),
                codec.encode_frames(ref_shading_video))

    t_encode, mem_encode, (x0, shading, ref_latents, ref_shading) = timed(encode, args.repeats)
    g = torch.Generator().manual_seed(0)
    config = TrainConfig(out=Path("/tmp/unused"), shift=3.0)

    def train_step():
        noise = torch.randn(x0.shape, generator=g).to(device, dtype)
        sigma = sample_sigmas(g, 1, 0.0, 1.0, config.shift).to(device)
        xt = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
        with torch.autocast(device.type, dtype=dtype):
            pred = model(xt.to(dtype), sigma * 1000, shading, controls, ref_latents, ref_shading, ref_controls)
            loss = torch.nn.functional.mse_loss(pred.float(), (noise - x0).float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    t_train, mem_train, loss = timed(train_step, args.repeats)

    scheduler = make_scheduler("euler", 3.0)
    scheduler.set_timesteps(25, device=device)

    @torch.no_grad()
    def sample_step():
        latents = torch.randn(x0.shape, device=device, dtype=dtype)
        t = scheduler.timesteps[0]
        two = lambda x: torch.cat([x, x])  # noqa: E731
        drop = torch.tensor([False, True], device=device)
        with torch.autocast(device.type, dtype=dtype):
            v = model(two(latents), two(t.expand(1).float()), two(shading), two(controls), two(ref_latents),
                      two(ref_shading), two(ref_controls), drop_controls=drop)
        v_cond, v_drop = v.float().chunk(2)
        scheduler._step_index = None  # a fresh first step each repeat
        return scheduler.step(v_drop + 5.0 * (v_cond - v_drop), t, latents.float(), return_dict=False)[0]

    model.eval()
    t_sample, mem_sample, latents = timed(sample_step, args.repeats)
    t_decode, mem_decode, decoded = timed(lambda: codec.decode(latents.to(dtype)), 1)
    assert decoded.shape == video.shape

    latent_frames = x0.shape[2]
    tokens = (latent_frames + k) * (x0.shape[3] // 2) * (x0.shape[4] // 2)
    result = {
        "machine": machine_info(str(device)),
        "preset": args.preset, "size": s, "frames": f, "refs": k, "dtype": "bfloat16",
        "weights": "random (Wan2.1-T2V-1.3B configuration; Wan VAE architecture)",
        "parameters": params, "trainable_parameters_lora": sum(p.numel() for p in trainable), "lora_rank": args.rank,
        "latent_shape": list(x0.shape), "tokens_in_context": tokens,
        "vae_encode_s": t_encode, "vae_encode_peak_gib": mem_encode,
        "lora_train_step_s": t_train, "lora_train_step_peak_gib": mem_train, "train_loss": loss,
        "sampling_step_s_guided": t_sample, "sampling_step_peak_gib": mem_sample,
        "vae_decode_s": t_decode, "vae_decode_peak_gib": mem_decode,
        "gradient_checkpointing": True,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
