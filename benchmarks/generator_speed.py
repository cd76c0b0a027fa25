#!/usr/bin/env python
"""Generator speed on real Wan2.1 shapes: ours against stock diffusers + peft LoRA, one process, one GPU.

    python benchmarks/generator_speed.py [--cases train-10k,forward-33k,...] [--budget-s 480] [--quick]

Both sides run in the same process on the same GPU, on the same randomly initialised weights (speed
does not depend on their values): one ``WanTransformer3DModel`` of the preset with peft LoRA (rank 64
on every attention projection and both FFN projections), bf16 weights, LoRA and AdamW states, no
autocast, gradient checkpointing of every block.

- **stock**: that model's own ``forward`` (diffusers 0.42.1, default attention dispatch) on
  ``tokens`` video tokens and 512 text tokens.
- **ours**: ``LiftAvatarTransformer`` wrapping the same base (same LoRA) plus its shading, expression
  controls (``both``: per-frame add and cross-attention adapters) and 5 reference frames, at the
  same token count (5 of the latent frames are references) and the same 512 text tokens. ``plain``
  is the code path before issue 8; ``fast`` is ``SpeedConfig(fast_path=True, attention=<fastest
  backend measured here>)``; ``fast+saveN`` keeps the self-attention outputs of N blocks, N chosen
  so that the peak memory stays at or below stock's.

Shapes: ``10k`` = 512² × 17 frames + 5 references (10 latent frames of 64×64 → 10,240 tokens);
``33k`` = 480×832 × 81 frames (21 latent frames of 60×104 → 32,760 tokens; ours: 61 target frames
+ 5 references). Peak memory is ``torch.cuda.max_memory_allocated`` over the timed steps, counted
for the side's own weights (the other side's modules stay resident and are subtracted).

FLOPs are counted analytically (``liftavatar.generator.speed.wan_forward_flops``: linears, LoRA,
self- and cross-attention of the base transformer; ours' extra control modules are not credited).
Training steps count 3 × forward (model FLOPs; the recomputation of checkpointing is not counted).
The share is of the bf16 matmul peak measured in the same run (square GEMMs, CUDA events).

Cases, in the order run (``--cases`` picks a subset, peak and attention always run first; a case
predicted to end past ``--budget-s`` is skipped and the JSON says so):

- peak: the bf16 matmul peak; attention: each SDPA backend (cuDNN, flash, efficient, torch's default)
  at both lengths, forward and forward+backward; ours uses the fastest.
- train-10k, forward-33k: stock, ours fast (+ saved attention where memory allows), ours plain.
- sample: one 17-frame 512² clip with 5 references, end to end. Ours: LiftAvatarPipeline, UniPC at
  ``--sample-steps`` steps, guidance batched into one pass, VAE encode of references and shading
  maps, VAE decode. Stock recipe: 50 Euler steps, guidance as two batch-1 passes over the same
  10,240-token context, VAE decode of the 17 frames.
- train-33k; numerics (bf16 fast options vs plain vs an fp32 reference at 10k tokens: outputs and
  LoRA gradients); steps-quality (PSNR of fewer solver steps against the 50-step Euler output on the
  small prior's benchmark clips, and bf16 fast vs fp32 plain sampling); 14b (the 14B preset at 10k
  tokens); profile (top CUDA kernels of one 33k forward); compile (``torch.compile`` of the block
  unit); forward-10k; sample-extra (ours at 50 Euler steps; the stock recipe without references in
  context, 5,120 tokens); recompute-bound (a 10k training step with no checkpointing at all, beside
  stock and ours under the memory bound: what recomputation costs).

Writes benchmarks/results/generator_speed.json after every measurement (device named); ``--quick``
runs every case at toy sizes on the CPU (a smoke test of this script: numbers meaningless, written
to the temporary directory).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from liftavatar.generator.speed import SpeedConfig, wan_forward_flops
from liftavatar.generator.transformer import LiftAvatarTransformer, TransformerConfig
from liftavatar.io import json_safe
from liftavatar.report import machine_info

RESULTS = Path(__file__).resolve().parent / "results"
D = 43  # kinematic controls per frame: 37 expression coefficients + 6 pose
REFS = 5
GIB = 2 ** 30
ALL_CASES = ("peak", "attention", "train-10k", "forward-33k", "sample", "train-33k", "numerics", "steps-quality",
             "14b", "profile", "compile", "forward-10k", "sample-extra", "recompute-bound", "train-profile")
# Rough H100 seconds per case (including building what it needs), for the budget check.
ESTIMATE_S = {"peak": 5, "attention": 10, "train-10k": 30, "forward-33k": 20, "sample": 50, "train-33k": 45,
              "numerics": 40, "steps-quality": 50, "14b": 80, "compile": 240, "profile": 20, "forward-10k": 10,
              "sample-extra": 45, "recompute-bound": 120, "train-profile": 150}


@dataclass(frozen=True)
class Shape:
    name: str
    latent_hw: tuple[int, int]
    frames: int  # latent frames in context (ours: REFS of them are references)

    def tokens(self, patch: tuple[int, int, int]) -> int:
        return self.frames * (self.latent_hw[0] // patch[1]) * (self.latent_hw[1] // patch[2])


class Bench:
    """Shared state: arguments, device, results (written after every case), the clock."""

    def __init__(self, args):
        self.args = args
        self.quick = args.quick
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.dtype = torch.bfloat16
        self.start = time.perf_counter()
        self.text_tokens = 8 if self.quick else 512
        self.rank = 4 if self.quick else args.rank
        self.repeats = 1 if self.quick else args.repeats
        if self.quick:
            self.presets = {"1.3b": ("tiny", {}), "14b": ("tiny", {"num_layers": 3})}
            self.shapes = {"10k": Shape("10k", (8, 8), 10), "33k": Shape("33k", (8, 16), 21)}
        else:
            self.presets = {"1.3b": ("wan2.1-1.3b", {}), "14b": ("wan2.1-14b", {})}
            self.shapes = {"10k": Shape("10k", (64, 64), 10), "33k": Shape("33k", (60, 104), 21)}
        self.results: dict = {
            "machine": machine_info(str(self.device)),
            "benchmark": "generator_speed",
            "quick": self.quick,
            "versions": versions(),
            "setup": {"lora_rank": self.rank, "lora_targets": "to_q, to_k, to_v, to_out.0 (self- and cross-attention), "
                      "ffn.net.0.proj, ffn.net.2", "dtype": "bfloat16 (weights, LoRA, AdamW states; no autocast)",
                      "gradient_checkpointing": "every block (ours: block + its control adapter)",
                      "text_tokens": self.text_tokens, "references": REFS, "repeats": self.repeats,
                      "weights": "random (speed does not depend on their values)",
                      "flops": "analytic model FLOPs (liftavatar.generator.speed.wan_forward_flops); "
                               "training = 3 x forward, recomputation not counted"},
            "cases": {}, "skipped": {}, "errors": {},
        }
        self.models: dict = {}
        self.partial: dict = {}  # the running case's results, written as they come

    # ---- bookkeeping ----------------------------------------------------------------------------

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def log(self, *parts) -> None:
        print(f"[{self.elapsed():6.1f}s]", *parts, flush=True)

    def write(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        self.results["summary"] = summarise(self.results)
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(json_safe(self.results), indent=2, default=str))
        tmp.replace(out)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def clean(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    # ---- models -----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def building(self, dtype=None):
        """Create modules directly on the device in ``dtype`` (bf16 default: a 14B model never exists in fp32)."""
        old = torch.get_default_dtype()
        torch.set_default_dtype(dtype or self.dtype)
        try:
            with torch.device(self.device):
                yield
        finally:
            torch.set_default_dtype(old)

    def model(self, size: str):
        """(stock base, ours) sharing one base with LoRA; built once per size (the other size is freed)."""
        if size in self.models:
            return self.models[size]
        for other in [k for k in self.models if k != "vae"]:
            del self.models[other]
        self.clean()
        preset, overrides = self.presets[size]
        from diffusers import WanTransformer3DModel

        config = TransformerConfig.from_preset(preset, D, "both", **overrides)
        torch.manual_seed(0)
        with self.building():
            base = WanTransformer3DModel(**config.base)
            ours = LiftAvatarTransformer(config, base=base)
            ours.add_lora(self.rank)
        ours.to(self.device, self.dtype)  # also the float64 RoPE tables and any fp32 LoRA weights
        base.enable_gradient_checkpointing()
        ours.enable_gradient_checkpointing()
        self.models[size] = (base, ours)
        self.results.setdefault("models", {})[size] = {
            "preset": preset, "overrides": overrides, "base_parameters": _count(base),
            "lora_parameters": sum(p.numel() for n, p in base.named_parameters() if "lora_" in n),
            "ours_extra_parameters": _count(ours) - _count(base),
            "ours_trainable_parameters": sum(p.numel() for p in ours.parameters() if p.requires_grad)}
        return base, ours

    def flops(self, base, tokens: int, batch: int = 1) -> float:
        return wan_forward_flops(dict(base.config), tokens, self.text_tokens, self.rank, batch)

    # ---- inputs -------------------------------------------------------------------------------------

    def stock_inputs(self, base, shape: Shape, batch: int = 1):
        c = base.config.in_channels
        h, w = shape.latent_hw
        g = torch.Generator(self.device).manual_seed(1)
        x = torch.randn(batch, c, shape.frames, h, w, generator=g, device=self.device, dtype=self.dtype)
        prompt = torch.randn(batch, self.text_tokens, base.config.text_dim, generator=g, device=self.device,
                             dtype=self.dtype)
        return x, prompt

    def ours_inputs(self, base, shape: Shape, batch: int = 1):
        c = base.config.in_channels
        h, w = shape.latent_hw
        t = shape.frames - REFS
        g = torch.Generator(self.device).manual_seed(2)
        r = lambda *s: torch.randn(*s, generator=g, device=self.device, dtype=self.dtype)  # noqa: E731
        return dict(latents=r(batch, c, t, h, w), shading=r(batch, c, t, h, w), controls=r(batch, t, 4, D),
                    ref_latents=r(batch, c, REFS, h, w), ref_shading=r(batch, c, REFS, h, w),
                    ref_controls=r(batch, REFS, 4, D),
                    prompt_embeds=r(batch, self.text_tokens, base.config.text_dim))

    # ---- timing ---------------------------------------------------------------------------------------

    def timed(self, fn, repeats: int | None = None) -> dict:
        """Median wall seconds of ``fn`` (synchronised) after one warm-up call; peak memory of the timed calls."""
        repeats = repeats or self.repeats
        first = time.perf_counter()
        fn()
        self.sync()
        first = time.perf_counter() - first
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else float("nan")
        return {"s": statistics.median(times), "s_all": times, "first_call_s": first, "peak_bytes": peak}

    def measure(self, module, own_static: int, run) -> dict:
        """``run`` timed, with its peak memory counted for ``module``'s own weights only."""
        self.clean()
        before = torch.cuda.memory_allocated(self.device) if self.cuda else 0
        result = run()
        if self.cuda:
            result["peak_gib"] = (result.pop("peak_bytes") - before + own_static) / GIB
        else:
            result.pop("peak_bytes")
            result["peak_gib"] = float("nan")
        return result

    # ---- the measured operations ------------------------------------------------------------------------

    def train_step(self, side: str, size: str, shape: Shape, speed: SpeedConfig | None = None):
        """``step()``: one LoRA training step of ``side`` (flow-matching loss, backward, AdamW), with its inputs
        and optimizer built; the model is set to ``speed`` and to training mode."""
        base, ours, model = self._side(side, size, speed)
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        if side == "stock":
            x0, prompt = self.stock_inputs(base, shape)
            forward = lambda xt, t: base(xt, t, prompt, return_dict=False)[0]  # noqa: E731
        else:
            inputs = self.ours_inputs(base, shape)
            x0 = inputs.pop("latents")
            forward = lambda xt, t: ours(xt, t, **inputs)  # noqa: E731
        noise = torch.randn_like(x0)
        sigma = torch.full((1,), 0.6, device=self.device)
        xt = ((1 - sigma) * x0.float() + sigma * noise.float()).to(self.dtype)
        target = (noise.float() - x0.float())

        def step():
            loss = F.mse_loss(forward(xt, sigma * 1000).float(), target)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    def train(self, side: str, size: str, shape: Shape, speed: SpeedConfig | None = None) -> dict:
        base, ours = self.model(size)  # train_step sets the speed
        return self._rate(base if side == "stock" else ours, base, shape,
                          lambda: self.timed(self.train_step(side, size, shape, speed)), passes=3, speed=speed)

    def forward(self, side: str, size: str, shape: Shape, speed: SpeedConfig | None = None,
                repeats: int | None = None) -> dict:
        base, ours, model = self._side(side, size, speed)
        model.eval()

        def run():
            t = torch.full((1,), 600.0, device=self.device)
            if side == "stock":
                x, prompt = self.stock_inputs(base, shape)
                call = lambda: base(x, t, prompt, return_dict=False)[0]  # noqa: E731
            else:
                inputs = self.ours_inputs(base, shape)
                x = inputs.pop("latents")
                call = lambda: ours(x, t, **inputs)  # noqa: E731
            with torch.no_grad():
                return self.timed(call, repeats)

        return self._rate(model, base, shape, run, passes=1, speed=speed)

    def _side(self, side: str, size: str, speed: SpeedConfig | None):
        """(stock base, ours, the model of ``side``), ours set to ``speed`` (default: the plain path)."""
        base, ours = self.model(size)
        if side != "stock":
            ours.set_speed(speed or SpeedConfig())
        return base, ours, base if side == "stock" else ours

    def _rate(self, model, base, shape: Shape, run, passes: int, speed: SpeedConfig | None) -> dict:
        """Time ``run``, then tokens/s and model FLOP/s (``passes`` × the forward FLOPs: 3 for a training step)."""
        result = self.measure(model, _static_bytes(model), run)
        tokens = shape.tokens(base.config.patch_size)
        flops = passes * self.flops(base, tokens)
        result.update(tokens=tokens, tokens_per_s=tokens / result["s"], model_tflop=flops / 1e12,
                      tflops_per_s=flops / result["s"] / 1e12)
        self._share(result)
        if speed is not None:
            result["speed"] = vars(speed)
        return result

    def _share(self, result: dict) -> None:
        peak = self.results.get("cases", {}).get("peak", {}).get("bf16_matmul_tflops")
        if peak:
            result["share_of_measured_peak"] = result["tflops_per_s"] / peak

    def best_attention(self, shape: Shape, training: bool) -> str:
        table = self.results["cases"].get("attention", {}).get(shape.name, {})
        key = "fwd_bwd_ms" if training else "fwd_ms"
        timed = {n: r[key] for n, r in table.items() if n != "default" and isinstance(r, dict) and key in r}
        return min(timed, key=timed.get) if timed else "default"


# ---- cases ----------------------------------------------------------------------------------------------

def case_peak(b: Bench) -> dict:
    """bf16 matmul peak: square GEMMs timed with CUDA events, best of the sizes."""
    sizes = (256, 512) if b.quick else (4096, 8192, 16384)
    out = {}
    for n in sizes:
        x = torch.randn(n, n, device=b.device, dtype=b.dtype)
        y = torch.randn(n, n, device=b.device, dtype=b.dtype)
        reps = 3 if b.quick else (50 if n <= 8192 else 12)
        for _ in range(2):  # _event_time warms up once more
            torch.mm(x, y)
        seconds = _event_time(b, lambda: torch.mm(x, y), reps)  # noqa: B023  (called at once)
        out[str(n)] = 2 * n ** 3 / seconds / 1e12
        del x, y
    return {"tflops_by_size": out, "bf16_matmul_tflops": max(out.values())}


def case_attention(b: Bench) -> dict:
    """Each SDPA backend at the self-attention shape of both lengths (1.3B heads), forward and forward+backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    preset, overrides = b.presets["1.3b"]
    cfg = {**TransformerConfig.from_preset(preset, D).base, **overrides}
    heads, head_dim = cfg["num_attention_heads"], cfg["attention_head_dim"]
    backends = {"default": None, "cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    out = {"versions": {"cudnn": torch.backends.cudnn.version() if b.cuda else None}}
    for shape in b.shapes.values():
        length = shape.tokens(cfg["patch_size"])
        flop = 4 * length * length * heads * head_dim
        qkv = [torch.randn(1, length, heads, head_dim, device=b.device, dtype=b.dtype).transpose(1, 2)
               .requires_grad_() for _ in range(3)]
        row: dict = {"tokens": length}
        try:
            row["default_choice"] = SDPBackend(torch._fused_sdp_choice(*qkv)).name
        except Exception as exc:  # noqa: BLE001  (private API: informative only)
            row["default_choice"] = f"unknown ({type(exc).__name__})"
        for name, backend in backends.items():
            ctx = contextlib.nullcontext if backend is None else partial(sdpa_kernel, [backend])

            def forward(qkv=qkv):
                return F.scaled_dot_product_attention(*qkv)

            def both(qkv=qkv):
                o = F.scaled_dot_product_attention(*qkv)
                o.backward(torch.ones_like(o))

            try:
                with torch.no_grad(), ctx():
                    fwd = _event_time(b, forward, 2 if b.quick else 10)
                with ctx():
                    bwd = _event_time(b, both, 1 if b.quick else 5)
                for t in qkv:
                    t.grad = None
                row[name] = {"fwd_ms": fwd * 1e3, "fwd_bwd_ms": bwd * 1e3, "fwd_tflops": flop / fwd / 1e12,
                             "fwd_bwd_tflops": 3.5 * flop / bwd / 1e12}
            except RuntimeError as exc:
                row[name] = {"error": str(exc).splitlines()[0][:200]}
        out[shape.name] = row
        del qkv
        b.clean()
    return out


def _event_time(b: Bench, fn, reps: int) -> float:
    fn()
    b.sync()
    if b.cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps


def _save_blocks(b: Bench, size: str, shape: Shape, headroom_gib: float) -> int:
    """How many blocks can keep their self-attention output within ``headroom_gib``."""
    base, _ = b.model(size)
    cfg = base.config
    tokens = shape.tokens(cfg.patch_size)
    per_block = tokens * cfg.num_attention_heads * (cfg.attention_head_dim * 2 + 4 * 2)  # output + stats
    if not b.cuda:
        return 1
    return max(0, min(cfg.num_layers, int(0.85 * headroom_gib * GIB / per_block)))


def _train_cases(b: Bench, size: str, shape_name: str, plain: bool, save_all: bool, out: dict) -> dict:
    """Training steps, stock and ours; ``out`` is filled (and the JSON written) as each variant finishes."""
    shape = b.shapes[shape_name]
    b.log(f"train {size} {shape_name}: stock")
    out["stock"] = b.train("stock", size, shape)
    b.write()
    b.log(f"  stock {out['stock']['s']:.3f} s/step, {out['stock']['peak_gib']:.2f} GiB")
    attention = b.best_attention(shape, training=True)
    fast = SpeedConfig(fast_path=True, attention=attention)
    out["ours_fast"] = b.train("ours", size, shape, fast)
    b.write()
    b.log(f"  ours fast ({attention}) {out['ours_fast']['s']:.3f} s/step, {out['ours_fast']['peak_gib']:.2f} GiB")
    layers = b.model(size)[0].config.num_layers
    headroom = out["stock"]["peak_gib"] - out["ours_fast"]["peak_gib"]
    n = _save_blocks(b, size, shape, headroom) if math.isfinite(headroom) else 1
    if n:
        out[f"ours_fast_save{n}"] = b.train("ours", size, shape, SpeedConfig(fast_path=True, attention=attention,
                                                                            save_attention=n))
        b.write()
        b.log(f"  ours fast+save{n} {out[f'ours_fast_save{n}']['s']:.3f} s/step, "
              f"{out[f'ours_fast_save{n}']['peak_gib']:.2f} GiB")
    if save_all and n < layers:
        out[f"ours_fast_save{layers}"] = b.train("ours", size, shape, SpeedConfig(
            fast_path=True, attention=attention, save_attention=layers))
        b.write()
        b.log(f"  ours fast+save{layers} {out[f'ours_fast_save{layers}']['s']:.3f} s/step, "
              f"{out[f'ours_fast_save{layers}']['peak_gib']:.2f} GiB")
    if plain:
        out["ours_plain"] = b.train("ours", size, shape)
        b.log(f"  ours plain {out['ours_plain']['s']:.3f} s/step, {out['ours_plain']['peak_gib']:.2f} GiB")
    b.model(size)[1].set_speed()
    return out


def _forward_cases(b: Bench, size: str, shape_name: str, plain: bool, out: dict) -> dict:
    shape = b.shapes[shape_name]
    out["stock"] = b.forward("stock", size, shape)
    b.write()
    b.log(f"forward {size} {shape_name}: stock {out['stock']['s']:.3f} s")
    attention = b.best_attention(shape, training=False)
    out["ours_fast"] = b.forward("ours", size, shape, SpeedConfig(fast_path=True, attention=attention))
    b.write()
    b.log(f"  ours fast ({attention}) {out['ours_fast']['s']:.3f} s")
    if plain:
        out["ours_plain"] = b.forward("ours", size, shape)
        b.log(f"  ours plain {out['ours_plain']['s']:.3f} s")
    b.model(size)[1].set_speed()
    return out


def case_train_10k(b):
    return _train_cases(b, "1.3b", "10k", plain=True, save_all=True, out=b.partial)


def case_train_33k(b):
    return _train_cases(b, "1.3b", "33k", plain=False, save_all=False, out=b.partial)


def case_forward_33k(b):
    return _forward_cases(b, "1.3b", "33k", plain=True, out=b.partial)


def case_forward_10k(b):
    return _forward_cases(b, "1.3b", "10k", plain=False, out=b.partial)


def _codec(b: Bench):
    if b.quick:
        from liftavatar.generator.codec import PixelCodec

        return PixelCodec(4)
    if "vae" not in b.models:
        from diffusers import AutoencoderKLWan

        from liftavatar.generator.codec import WanVAECodec

        with b.building():
            vae = AutoencoderKLWan()  # the Wan2.1 VAE architecture, random weights
        b.models["vae"] = WanVAECodec(vae.to(b.device, b.dtype))
    return b.models["vae"]


def _clip_inputs(b: Bench, frames: int, size: int):
    from liftavatar.generator.pipeline import GenerationInputs

    g = torch.Generator().manual_seed(3)
    return GenerationInputs(ref_frames=torch.rand(REFS, 3, size, size, generator=g),
                            ref_shading=torch.rand(REFS, 3, size, size, generator=g),
                            ref_controls=torch.randn(REFS, D, generator=g),
                            shading=torch.rand(frames, 3, size, size, generator=g),
                            controls=torch.randn(frames, D, generator=g))


def _ours_sampling(b: Bench, steps: int, solver: str, speed: SpeedConfig) -> dict:
    from liftavatar.generator.pipeline import LiftAvatarPipeline

    _, ours = b.model("1.3b")
    codec = _codec(b)
    frames, size = (5, 32) if b.quick else (17, 512)
    pipe = LiftAvatarPipeline(ours, codec, window=frames, shift=3.0, device=b.device, dtype=b.dtype, speed=speed)
    inputs = _clip_inputs(b, frames, size)
    call = lambda s: pipe(inputs, steps=s, guidance=b.args.guidance, seed=0, solver=solver, batch_size=1)  # noqa: E731
    call(2)  # warm-up: VAE and transformer kernels, solver set-up
    b.sync()
    start = time.perf_counter()
    video = call(steps)
    b.sync()
    seconds = time.perf_counter() - start
    ours.set_speed()
    return {"s": seconds, "steps": steps, "solver": solver, "guidance": b.args.guidance,
            "transformer_passes": steps, "batch_per_pass": 2, "frames": frames, "size": size,
            "speed": vars(speed), "finite": bool(torch.isfinite(video).all())}


def _stock_sampling(b: Bench, context_frames: int, steps: int = 50) -> dict:
    """The stock recipe: Euler, classifier-free guidance as two batch-1 passes, then the VAE decode."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    base, _ = b.model("1.3b")
    base.eval()
    codec = _codec(b)
    h, w = b.shapes["10k"].latent_hw
    target_frames = 5
    g = torch.Generator(b.device).manual_seed(4)
    cond = torch.randn(1, b.text_tokens, base.config.text_dim, generator=g, device=b.device, dtype=b.dtype)
    uncond = torch.randn(1, b.text_tokens, base.config.text_dim, generator=g, device=b.device, dtype=b.dtype)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)

    def run():
        scheduler.set_timesteps(steps, device=b.device)
        latents = torch.randn(1, base.config.in_channels, context_frames, h, w, generator=g, device=b.device,
                              dtype=torch.float32)
        with torch.no_grad():
            for t in scheduler.timesteps:
                x = latents.to(b.dtype)
                tt = t.expand(1).float()
                v_c = base(x, tt, cond, return_dict=False)[0]
                v_u = base(x, tt, uncond, return_dict=False)[0]
                v = v_u.float() + b.args.guidance * (v_c.float() - v_u.float())
                latents = scheduler.step(v, t, latents, return_dict=False)[0]
            return codec.decode(latents[:, :, -target_frames:].to(b.dtype))

    b.sync()
    start = time.perf_counter()
    video = run()
    b.sync()
    tokens = context_frames * (h // 2) * (w // 2)
    return {"s": time.perf_counter() - start, "steps": steps, "solver": "euler", "guidance": b.args.guidance,
            "transformer_passes": 2 * steps, "batch_per_pass": 1, "context_tokens": tokens,
            "finite": bool(torch.isfinite(video).all())}


def case_sample(b: Bench) -> dict:
    attention = b.best_attention(b.shapes["10k"], training=False)
    speed = SpeedConfig(fast_path=True, attention=attention)
    out = b.partial
    out["ours"] = _ours_sampling(b, b.args.sample_steps, "unipc", speed)
    b.write()
    b.log(f"sample: ours unipc-{b.args.sample_steps} {out['ours']['s']:.2f} s")
    out["stock"] = _stock_sampling(b, b.shapes["10k"].frames)
    b.log(f"  stock euler-50 x2 passes {out['stock']['s']:.2f} s")
    out["speedup"] = out["stock"]["s"] / out["ours"]["s"]
    return out


def case_sample_extra(b: Bench) -> dict:
    attention = b.best_attention(b.shapes["10k"], training=False)
    out = b.partial
    out["ours_euler50"] = _ours_sampling(b, 50, "euler", SpeedConfig(fast_path=True, attention=attention))
    b.write()
    b.log(f"sample-extra: ours euler-50 {out['ours_euler50']['s']:.2f} s")
    out["stock_no_refs_5k"] = _stock_sampling(b, b.shapes["10k"].frames - REFS)
    b.log(f"  stock without references (5k tokens) {out['stock_no_refs_5k']['s']:.2f} s")
    return out


def _errors(a: torch.Tensor, ref: torch.Tensor) -> dict:
    a, ref = a.double(), ref.double()
    return {"max_abs": (a - ref).abs().max().item(), "rel_l2": ((a - ref).norm() / ref.norm().clamp_min(1e-30)).item()}


def case_numerics(b: Bench) -> dict:
    """Outputs and LoRA gradients of each fast-path option against the plain path, in bf16, at 10k tokens,
    on the 1.3B block shapes (6 blocks), with every zero-initialised module and LoRA B randomised;
    an fp32 plain run is the reference, so "within bf16 tolerance" means: no further from it than bf16 plain."""
    preset, overrides = b.presets["1.3b"]
    config = TransformerConfig.from_preset(preset, D, "both", **{**overrides, "num_layers": 2 if b.quick else 6})
    torch.manual_seed(5)
    with b.building(torch.float32):
        model32 = LiftAvatarTransformer(config)
        model32.add_lora(b.rank)
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        for _, p in model32.zero_initialised_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    model32.enable_gradient_checkpointing()
    model16 = copy.deepcopy(model32).to(b.dtype)
    shape = b.shapes["10k"]
    inputs = b.ours_inputs(model32.base, shape, batch=2)
    inputs["drop_controls"] = torch.tensor([False, True], device=b.device)
    latents = inputs.pop("latents")
    t = torch.tensor([600.0, 600.0], device=b.device)

    def run(model, speed: SpeedConfig, dtype, grads: bool):
        model.set_speed(speed)
        cast = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in inputs.items()}
        if not grads:
            with torch.no_grad():
                return model(latents.to(dtype), t, **cast).float(), None
        model.zero_grad(set_to_none=True)
        out = model(latents.to(dtype), t, **cast)
        out.float().square().mean().backward()
        lora = torch.cat([p.grad.float().flatten() for n, p in model.named_parameters() if "lora_B" in n])
        return out.detach().float(), lora

    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        ref_out, _ = run(model32, SpeedConfig(), torch.float32, False)
        _, ref_grad = run(model32, SpeedConfig(), torch.float32, True)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    del model32
    b.clean()
    plain_out, _ = run(model16, SpeedConfig(), b.dtype, False)
    _, plain_grad = run(model16, SpeedConfig(), b.dtype, True)
    out = {"blocks": config.base["num_layers"], "tokens": shape.tokens(config.base["patch_size"]), "batch": 2,
           "bf16_plain": {"output_vs_fp32": _errors(plain_out, ref_out), "lora_grad_vs_fp32": _errors(plain_grad,
                                                                                                       ref_grad)}}
    bound_out = out["bf16_plain"]["output_vs_fp32"]["rel_l2"]
    bound_grad = out["bf16_plain"]["lora_grad_vs_fp32"]["rel_l2"]
    options = {"fast": SpeedConfig(fast_path=True)}
    for name in ("cudnn", "flash", "efficient"):
        options[f"fast+{name}"] = SpeedConfig(fast_path=True, attention=name)
    options["fast+save_all"] = SpeedConfig(fast_path=True, save_attention=config.base["num_layers"],
                                           attention=b.best_attention(shape, training=True))
    layers = config.base["num_layers"]
    options["fast+compile+save_all+offload_all"] = SpeedConfig(
        fast_path=True, attention=b.best_attention(shape, training=True), compile="aot_eager" if b.quick else True,
        save_attention=layers, offload_activations=layers)
    for name, speed in options.items():
        try:
            o, _ = run(model16, speed, b.dtype, False)
            _, gr = run(model16, speed, b.dtype, True)
        except RuntimeError as exc:
            out[name] = {"error": str(exc).splitlines()[0][:200]}
            continue
        row = {"output_vs_bf16_plain": _errors(o, plain_out), "output_vs_fp32": _errors(o, ref_out),
               "lora_grad_vs_bf16_plain": _errors(gr, plain_grad), "lora_grad_vs_fp32": _errors(gr, ref_grad)}
        row["within_bf16_tolerance"] = bool(row["output_vs_fp32"]["rel_l2"] <= 1.5 * bound_out + 1e-6
                                            and row["lora_grad_vs_fp32"]["rel_l2"] <= 1.5 * bound_grad + 1e-6)
        out[name] = row
        b.log(f"numerics {name}: out rel {row['output_vs_fp32']['rel_l2']:.2e} (bf16 plain {bound_out:.2e}), "
              f"grad rel {row['lora_grad_vs_fp32']['rel_l2']:.2e} (bf16 plain {bound_grad:.2e})")
    out["criterion"] = "rel_l2 to the fp32 plain output (and LoRA gradients) at most 1.5 x that of bf16 plain"
    del model16
    b.clean()
    return out


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    mse = ((a.float() - ref.float()) ** 2).mean().clamp_min(1e-12)
    return float(10 * torch.log10(1 / mse))


def case_steps_quality(b: Bench) -> dict:
    """Fewer solver steps against the 50-step Euler output of the same prior, seed and inputs (PSNR, dB),
    and the fast bf16 path against plain fp32 at equal steps. Real run: the embedded small prior on
    held-out synthetic subjects (sparse capture → references, extreme capture → targets, as in
    benchmarks/generator.py); --quick: a random tiny model on random images."""
    from liftavatar.generator.pipeline import LiftAvatarPipeline

    settings = [("unipc", 5), ("unipc", 8), ("unipc", 10), ("unipc", 15), ("unipc", 20), ("euler", 10),
                ("euler", 25)]
    clips = []
    if b.quick:
        from liftavatar.generator.codec import PixelCodec

        model = LiftAvatarTransformer.from_preset("tiny", D, "both")
        pipe = LiftAvatarPipeline(model, PixelCodec(4), window=6, device=b.device)
        clips.append(("random", _clip_inputs(b, 6, 32), None))
        settings = settings[:2]
        prior_name = "random tiny model"
    else:
        from liftavatar.generator.inputs import generation_inputs
        from liftavatar.generator.prior import resolve_prior
        from liftavatar.synth.world import SynthSpec, synthesize

        prior = resolve_prior(None)
        prior_name = str(prior.name)
        pipe = LiftAvatarPipeline.from_pretrained(prior, device=str(b.device))
        size = pipe.size or 128
        tmp = tempfile.TemporaryDirectory()
        for seed in range(5200, 5200 + b.args.quality_subjects):
            sparse = synthesize(SynthSpec(seed=seed, preset="sparse", frames=100, size=size), Path(tmp.name) / f"s{seed}",
                                progress=False, device=str(b.device))
            extreme = synthesize(SynthSpec(seed=seed, preset="extreme", frames=16, size=size),
                                 Path(tmp.name) / f"e{seed}", progress=False, device=str(b.device))
            truth = torch.from_numpy(extreme.frames()).permute(0, 3, 1, 2).float() / 255
            clips.append((seed, generation_inputs(sparse, extreme, k=REFS, method="kmeans", seed=seed), truth))
    out: dict = {"prior": prior_name, "reference": "euler-50, fp32, plain path", "guidance": 1.0, "clips": {}}
    for name, inputs, truth in clips:
        row: dict = {}
        start = time.perf_counter()
        ref = pipe(inputs, steps=50, solver="euler", seed=0)
        row["euler-50_s"] = time.perf_counter() - start
        if truth is not None:
            row["euler-50_psnr_vs_truth"] = psnr(ref, truth)
        for solver, steps in settings:
            video = pipe(inputs, steps=steps, solver=solver, seed=0)
            row[f"{solver}-{steps}"] = {"psnr_vs_euler50": psnr(video, ref)}
            if truth is not None:
                row[f"{solver}-{steps}"]["psnr_vs_truth"] = psnr(video, truth)
        out["clips"][str(name)] = row
        b.log(f"steps-quality clip {name}: " + ", ".join(f"{k} {v['psnr_vs_euler50']:.1f} dB"
                                                          for k, v in row.items() if isinstance(v, dict)))
    # The fast path in bf16 against the plain fp32 path, equal steps, first clip.
    fast16 = LiftAvatarPipeline(copy.deepcopy(pipe.model), pipe.codec, window=pipe.window, shift=pipe.shift,
                                device=b.device, dtype=b.dtype, speed=SpeedConfig(
                                    fast_path=True, attention=b.best_attention(b.shapes["10k"], training=False)))
    inputs = clips[0][1]
    for solver, steps in (("euler", 50), ("unipc", b.args.sample_steps)):
        plain32 = pipe(inputs, steps=steps, solver=solver, seed=0)
        video = fast16(inputs, steps=steps, solver=solver, seed=0)
        out[f"bf16_fast_vs_fp32_plain_{solver}-{steps}_psnr"] = psnr(video, plain32)
    del fast16
    # Mean over clips.
    keys = [k for k in next(iter(out["clips"].values())) if isinstance(next(iter(out["clips"].values()))[k], dict)]
    out["mean_psnr_vs_euler50"] = {k: statistics.mean(c[k]["psnr_vs_euler50"] for c in out["clips"].values())
                                   for k in keys}
    if clips[0][2] is not None:
        out["mean_psnr_vs_truth"] = {k: statistics.mean(c[k]["psnr_vs_truth"] for c in out["clips"].values())
                                     for k in keys}
        out["mean_psnr_vs_truth"]["euler-50"] = statistics.mean(c["euler-50_psnr_vs_truth"]
                                                                for c in out["clips"].values())
    return out


def case_14b(b: Bench) -> dict:
    out = b.partial
    out["train"], out["forward"] = {}, {}
    _train_cases(b, "14b", "10k", plain=False, save_all=False, out=out["train"])
    _forward_cases(b, "14b", "10k", plain=False, out=out["forward"])
    del b.models["14b"]
    b.clean()
    return out


def case_profile(b: Bench) -> dict:
    """Top CUDA kernels of one 33k-token forward pass, stock and ours (fast)."""
    from torch.profiler import ProfilerActivity, profile

    shape = b.shapes["33k"]
    base, ours = b.model("1.3b")
    out = {}
    for side in ("stock", "ours_fast"):
        t = torch.full((1,), 600.0, device=b.device)
        if side == "stock":
            x, prompt = b.stock_inputs(base, shape)
            call = partial(base, x, t, prompt, return_dict=False)
        else:
            ours.set_speed(SpeedConfig(fast_path=True, attention=b.best_attention(shape, training=False)))
            inputs = b.ours_inputs(base, shape)
            call = partial(ours, inputs.pop("latents"), t, **inputs)
        base.eval()
        with torch.no_grad():
            call()
            b.sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
            with profile(activities=activities) as prof:
                call()
                b.sync()
        events = prof.key_averages()
        if b.cuda:
            from torch.autograd import DeviceType

            kernels = [(e, getattr(e, "self_device_time_total", 0.0)) for e in events
                       if getattr(e, "device_type", None) == DeviceType.CUDA]
        else:
            kernels = [(e, e.self_cpu_time_total) for e in events]
        kernels = sorted([k for k in kernels if k[1] > 0], key=lambda k: k[1], reverse=True)
        total = sum(us for _, us in kernels) or 1.0
        out[side] = {"total_ms": total / 1e3, "top": [{"name": e.key[:120], "ms": us / 1e3, "share": us / total,
                                                       "calls": e.count} for e, us in kernels[:15]]}
    ours.set_speed()
    return out


def _compile_backend(b: Bench) -> bool | str:
    """The torch.compile backend of the compiled cases (inductor; aot_eager for the CPU smoke test), with
    dynamo's recompile limits raised: every compiled variant of a case is its own graph."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(64, getattr(torch._dynamo.config, name)))
    return "aot_eager" if b.quick else True


def case_compile(b: Bench) -> dict:
    """torch.compile of the fast path's checkpointed block unit (first call = compile): training at 10k,
    forward at 33k, then training at 33k if the budget allows. One compiled graph serves every block.

    Training runs twice per length: ``save0`` (recompute everything) and ``save_all+offload_all`` (every
    block keeps its self-attention output, and what blocks keep waits in pinned host memory: less
    recomputation at a peak memory no higher than save0's); the summary takes the faster one whose peak
    stays within stock's."""
    backend = _compile_backend(b)
    out = b.partial
    shape10, shape33 = b.shapes["10k"], b.shapes["33k"]
    layers = b.model("1.3b")[0].config.num_layers

    def speed(shape, training, keep=0):
        return SpeedConfig(fast_path=True, attention=b.best_attention(shape, training), compile=backend,
                           save_attention=keep, offload_activations=keep)

    def train(key, shape, keep):
        out[key] = b.train("ours", "1.3b", shape, speed(shape, True, keep))
        b.write()
        b.log(f"compile {key}: {out[key]['s']:.3f} s/step, {out[key]['peak_gib']:.2f} GiB "
              f"(first call {out[key]['first_call_s']:.1f} s)")

    train("train-10k", shape10, 0)
    train(f"train-10k+save{layers}+offload{layers}", shape10, layers)
    out["forward-33k"] = b.forward("ours", "1.3b", shape33, speed(shape33, False))
    b.write()
    b.log(f"compile forward 33k: {out['forward-33k']['s']:.3f} s (first call {out['forward-33k']['first_call_s']:.1f} s)")
    # The compiled output against the eager fast path at 33k (the graph compiled above).
    base, ours = b.model("1.3b")
    inputs = b.ours_inputs(base, shape33)
    x = inputs.pop("latents")
    t = torch.full((1,), 600.0, device=b.device)
    with torch.no_grad():
        ours.set_speed(speed(shape33, False))
        compiled = ours(x, t, **inputs).float()
        ours.set_speed(SpeedConfig(fast_path=True, attention=b.best_attention(shape33, False)))
        eager = ours(x, t, **inputs).float()
    out["output_vs_eager_fast_33k"] = _errors(compiled, eager)
    del compiled, eager, inputs, x
    if b.quick or b.elapsed() + 120 < b.args.budget_s:
        train("train-33k", shape33, 0)
        train(f"train-33k+save{layers}+offload{layers}", shape33, layers)
    try:
        from torch._dynamo.utils import counters

        out["dynamo_unique_graphs"] = int(counters["stats"]["unique_graphs"])
    except Exception:
        pass
    ours.set_speed()
    return out


NO_CHECKPOINTING = "ours_compile_no_checkpointing"


def _recompute_variants(b: Bench) -> dict[str, SpeedConfig | None]:
    """The 10k training settings the recomputation studies compare: stock (None), ours compiled recomputing
    everything, ours compiled under the memory bound (every block's self-attention output kept and offloaded),
    and ours compiled with no checkpointing at all (:data:`NO_CHECKPOINTING`; run it under
    :func:`_checkpointing`)."""
    backend = _compile_backend(b)
    layers = b.model("1.3b")[0].config.num_layers
    attention = b.best_attention(b.shapes["10k"], True)
    compiled = partial(SpeedConfig, fast_path=True, attention=attention, compile=backend)
    return {"stock": None, "ours_compile_save0": compiled(),
            f"ours_compile_save{layers}_offload{layers}": compiled(save_attention=layers, offload_activations=layers),
            NO_CHECKPOINTING: compiled(compile_scope="unit")}


@contextlib.contextmanager
def _checkpointing(b: Bench, name: str):
    """Our model without gradient checkpointing while the :data:`NO_CHECKPOINTING` variant runs."""
    ours = b.model("1.3b")[1]
    ours.gradient_checkpointing = name != NO_CHECKPOINTING
    try:
        yield
    finally:
        ours.gradient_checkpointing = True


def case_recompute_bound(b: Bench) -> dict:
    """What recomputation costs at 10k tokens, side by side: stock, ours compiled under the memory bound
    (every block checkpointed, its self-attention output kept and offloaded), and ours compiled with no
    checkpointing at all — the time a step would take if memory were free, which bounds what any
    save/offload policy at stock's memory can reach."""
    shape = b.shapes["10k"]
    out = b.partial
    for name, speed in _recompute_variants(b).items():
        if name == "ours_compile_save0":
            continue
        with _checkpointing(b, name):
            out[name] = b.train("stock" if speed is None else "ours", "1.3b", shape, speed)
        b.write()
    for key, row in out.items():
        if isinstance(row, dict) and "s" in row:
            b.log(f"recompute-bound {key}: {row['s']:.3f} s/step, {row['peak_gib']:.2f} GiB")
    b.model("1.3b")[1].set_speed()
    return out


KERNEL_KINDS = (("attention backward", ("bprop", "flash_bwd", "fmha_bwd", "attention_backward", "dq_dk_dv")),
                ("attention forward", ("sdpa", "fprop", "flash_fwd", "fmha", "attention")),
                ("copy host<->device", ("memcpy dtoh", "memcpy htod", "memcpy")),
                ("optimizer", ("multi_tensor_apply", "adam")),
                ("matmul", ("nvjet", "gemm", "cutlass", "xmma", "sm90_", "cublas", "splitk")),
                ("compiled (triton)", ("triton",)))


def kernel_kind(name: str) -> str:
    """The category of a CUDA kernel, from its name (first match in :data:`KERNEL_KINDS`, else elementwise/other)."""
    low = name.lower()
    for kind, keys in KERNEL_KINDS:
        if any(k in low for k in keys):
            return kind
    return "elementwise/other"


def _union_ms(intervals: list[tuple[float, float, str]]) -> float:
    """Length of the union of (start, end, name) microsecond intervals, in ms."""
    total, end = 0.0, -math.inf
    for a, b, _ in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total / 1e3


def _idle_gaps(intervals: list[tuple[float, float, str]], top: int = 8) -> dict:
    """The GPU's idle time between compute kernels (gaps over 50 µs): total, and the longest gaps with the
    kernels on either side (what the GPU waited between)."""
    gaps, end, last = [], -math.inf, ""
    for a, b, name in sorted(intervals):
        if a - end > 50 and end > -math.inf:
            gaps.append(((a - end) / 1e3, last[:70], name[:70]))
        if b > end:
            end, last = b, name
    gaps.sort(reverse=True)
    return {"total_ms": sum(g[0] for g in gaps), "count": len(gaps),
            "longest": [{"ms": ms, "after": before, "before": after} for ms, before, after in gaps[:top]]}


def case_train_profile(b: Bench) -> dict:
    """Where a 10k training step's time goes, side by side: CUDA kernel time by kind (attention forward and
    backward, matmuls, compiled kernels, copies, optimizer), the time the compute kernels keep the GPU busy,
    and the step's wall time, for stock, ours compiled recomputing everything, ours compiled under the memory
    bound (attention saved and offloaded), and ours compiled with no checkpointing."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    shape = b.shapes["10k"]
    out = b.partial
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if b.cuda else [])
    for name, speed in _recompute_variants(b).items():
        with _checkpointing(b, name):
            step = b.train_step("stock" if speed is None else "ours", "1.3b", shape, speed)
            for _ in range(3):  # compile, then warm the allocator and the offload buffers
                step()
            b.sync()
            start = time.perf_counter()
            step()
            b.sync()
            unprofiled = time.perf_counter() - start
            with profile(activities=activities) as prof:
                start = time.perf_counter()
                step()
                b.sync()
                wall = time.perf_counter() - start
        kinds: dict[str, float] = {}
        busy = []
        runtime: dict[str, list[float]] = {}  # host-side CUDA runtime calls: where the CPU waits or allocates
        for event in prof.events():
            if getattr(event, "device_type", None) != DeviceType.CUDA:
                if event.name.startswith("cuda") and not event.name.startswith("cudaLaunch"):
                    row = runtime.setdefault(event.name, [0.0, 0])
                    row[0] += (event.time_range.end - event.time_range.start) / 1e3
                    row[1] += 1
                continue
            us = float(getattr(event, "device_time", 0.0) or 0.0) or (event.time_range.end - event.time_range.start)
            kind = kernel_kind(event.name)
            kinds[kind] = kinds.get(kind, 0.0) + us / 1e3
            if kind != "copy host<->device":
                busy.append((event.time_range.start, event.time_range.end, event.name))
        top_runtime = sorted(runtime.items(), key=lambda kv: -kv[1][0])[:8]
        out[name] = {"wall_ms_unprofiled": unprofiled * 1e3, "wall_ms_profiled": wall * 1e3,
                     "compute_busy_ms": _union_ms(busy), "kernel_ms_by_kind": dict(sorted(kinds.items())),
                     "idle_gaps": _idle_gaps(busy),
                     "host_runtime_calls": {k: {"ms": v[0], "calls": v[1]} for k, v in top_runtime}}
        b.write()
        b.log(f"train-profile {name}: {unprofiled * 1e3:.0f} ms/step, busy {out[name]['compute_busy_ms']:.0f} ms, "
              + ", ".join(f"{k} {v:.0f}" for k, v in sorted(kinds.items()))
              + f"; idle gaps {out[name]['idle_gaps']['total_ms']:.0f} ms; host calls "
              + ", ".join(f"{k} {v[0]:.0f} ms/{v[1]}" for k, v in top_runtime[:4]))
        del step, prof
        b.clean()
    b.model("1.3b")[1].set_speed()
    return out


CASES = {"peak": case_peak, "attention": case_attention, "train-10k": case_train_10k,
         "forward-33k": case_forward_33k, "sample": case_sample, "train-33k": case_train_33k,
         "forward-10k": case_forward_10k, "numerics": case_numerics, "steps-quality": case_steps_quality,
         "14b": case_14b, "profile": case_profile, "compile": case_compile, "sample-extra": case_sample_extra,
         "recompute-bound": case_recompute_bound, "train-profile": case_train_profile}


# ---- summary -----------------------------------------------------------------------------------------------

def _gib(row: dict) -> float:
    """A row's peak memory; NaN where it was not measured (CPU; null once the JSON is read back)."""
    value = row.get("peak_gib")
    return float("nan") if value is None else float(value)


def _best_within_memory(rows: dict) -> tuple[str, dict] | None:
    stock = rows.get("stock")
    ours = {k: v for k, v in rows.items() if k.startswith("ours_fast") and isinstance(v, dict) and "s" in v}
    if not stock or not ours:
        return None
    limit = _gib(stock)
    fits = {k: v for k, v in ours.items() if not math.isfinite(limit) or _gib(v) <= limit}
    pool = fits or ours
    name = min(pool, key=lambda k: pool[k]["s"])
    return name, pool[name]


def summarise(results: dict) -> dict:
    cases = results.get("cases", {})
    out: dict = {}
    for key, target in (("train-10k", 1.5), ("train-33k", 1.3)):
        rows = dict(cases.get(key) or {})
        for name, compiled in cases.get("compile", {}).items():
            if rows and name.split("+")[0] == key and isinstance(compiled, dict) and "s" in compiled:
                rows["ours_fast_compiled" + name[len(key):]] = compiled
        best = _best_within_memory(rows) if rows else None
        if best:
            name, row = best
            stock = rows["stock"]
            speedup = stock["s"] / row["s"]
            memory_ok = not math.isfinite(_gib(stock)) or _gib(row) <= _gib(stock)
            out[key] = {"best_ours": name, "ours_s": row["s"], "stock_s": stock["s"], "speedup": speedup,
                        "ours_peak_gib": row["peak_gib"], "stock_peak_gib": stock["peak_gib"], "target": target,
                        "met": bool(speedup >= target and memory_ok)}
    fwd = cases.get("forward-33k", {})
    if "ours_fast" in fwd and "share_of_measured_peak" in fwd["ours_fast"]:
        best = fwd["ours_fast"]
        comp = cases.get("compile", {}).get("forward-33k")
        if comp and "share_of_measured_peak" in comp and comp["s"] < best["s"]:
            best = comp
        out["forward-33k"] = {"ours_share": best["share_of_measured_peak"],
                              "stock_share": fwd["stock"].get("share_of_measured_peak"),
                              "compiled": best is not fwd["ours_fast"], "target": 0.5,
                              "met": bool(best["share_of_measured_peak"] >= 0.5)}
    sample = cases.get("sample", {})
    if "speedup" in sample:
        out["sample"] = {"speedup": sample["speedup"], "target": 3.0, "met": bool(sample["speedup"] >= 3.0)}
    quality = cases.get("steps-quality", {})
    if "mean_psnr_vs_euler50" in quality:
        out["steps-quality"] = quality["mean_psnr_vs_euler50"]
    return out


# ---- helpers -------------------------------------------------------------------------------------------------

def versions() -> dict:
    out = {"torch": torch.__version__}
    for name in ("diffusers", "peft", "triton"):
        try:
            out[name] = __import__(name).__version__
        except Exception:
            out[name] = None
    out["cuda"] = torch.version.cuda
    return out


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


def _static_bytes(module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(ALL_CASES), help="comma-separated subset of: " + ", ".join(ALL_CASES))
    parser.add_argument("--quick", action="store_true", help="toy sizes on the CPU: a smoke test of the script")
    parser.add_argument("--device", default=None)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sample-steps", type=int, default=10, help="our UniPC steps in the sampling case")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--quality-subjects", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="skip a case whose estimated cost would end the run past this many seconds")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--merge", action="store_true",
                        help="keep the cases of an existing --out JSON that this run does not repeat (a run longer "
                             "than one sitting, split by --cases); the JSON lists each run's machine and cases")
    args = parser.parse_args()
    args.device = args.device or ("cpu" if args.quick or not torch.cuda.is_available() else "cuda")
    if args.out is None:
        args.out = Path(tempfile.gettempdir()) / "generator_speed_quick.json" if args.quick else \
            RESULTS / "generator_speed.json"
    wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in wanted if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; choose from {', '.join(ALL_CASES)}")
    earlier = {}
    if args.merge and args.out.is_file():
        earlier = json.loads(args.out.read_text())
    if set(wanted) - {"peak", "attention"}:  # the others need the peak (shares) and the attention choice
        wanted = [c for c in ("peak", "attention") if c not in earlier.get("cases", {})] + wanted
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("no CUDA device here; use --quick (CPU smoke test) or run on a GPU machine.")
    torch.backends.cuda.matmul.allow_tf32 = False
    bench = Bench(args)
    if earlier:
        kept = {k: v for k, v in earlier.get("cases", {}).items() if k not in wanted}
        bench.results["cases"].update(kept)
        bench.results["runs"] = [*earlier.get("runs", [{"machine": earlier.get("machine"),
                                                         "cases": list(earlier.get("cases", {}))}])]
        bench.results["runs"] = [{**r, "cases": [c for c in r["cases"] if c in kept]} for r in bench.results["runs"]]
    bench.results.setdefault("runs", []).append({"machine": bench.results["machine"], "cases": wanted})
    bench.log(f"device {bench.results['machine'].get('gpu', args.device)}; cases: {', '.join(wanted)}")
    for name in [c for c in ALL_CASES if c in wanted]:
        estimate = 0 if args.quick else ESTIMATE_S[name]
        if bench.elapsed() + estimate > args.budget_s:
            bench.results["skipped"][name] = f"budget: {bench.elapsed():.0f} s elapsed + ~{estimate} s > {args.budget_s:.0f} s"
            bench.log(f"skip {name} ({bench.results['skipped'][name]})")
            bench.write()
            continue
        bench.log(f"case {name}")
        start = time.perf_counter()
        bench.partial = bench.results["cases"][name] = {}
        try:
            bench.results["cases"][name] = CASES[name](bench)
            bench.results["cases"][name]["case_wall_s"] = round(time.perf_counter() - start, 1)
        except Exception as exc:  # one failing case must not lose the others (partial results stay)
            bench.results["errors"][name] = "".join(traceback.format_exception(exc))[-3000:]
            bench.log(f"case {name} failed: {type(exc).__name__}: {exc}")
            for size in [s for s in list(bench.models) if s != "vae"]:
                bench.models[size][1].set_speed()
            bench.clean()
        bench.write()
    bench.log(f"done; wrote {args.out}")
    print(json.dumps(bench.results["summary"], indent=2), flush=True)
    if bench.results["errors"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
