"""The fast forward path of LiftAvatarTransformer (issue 8): the same function, less work.

Selected with :meth:`LiftAvatarTransformer.set_speed` (a :class:`SpeedConfig`); the default
``SpeedConfig()`` keeps the plain path, which re-states diffusers' ``WanTransformer3DModel.forward``.
``fast_path=True`` runs the blocks through :func:`block_unit` instead, which computes what
``WanTransformerBlock.forward`` (diffusers 0.42) plus the control cross-attention adapter compute,
with these changes (each checked against the plain path on the tiny preset in fp32 by
tests/generator/test_speed_paths.py):

- **Per-frame modulation.** References sit at timestep 0 and targets at t, so the timestep
  modulation is one (6, dim) vector per latent frame. The plain path feeds diffusers a per-token
  timestep, which materialises (B, L, 6, dim) in the condition embedder and again, in fp32, in every
  block (377 MB per block at 10k tokens, kept alive for the backward pass by the gate). Here the
  embedder sees one timestep per frame and the block broadcasts (B, F, 1, dim) over the frame's
  tokens, viewed as (B, F, tokens, dim): the same products and sums, token by token.
- **One checkpoint unit per block**: the block and its control adapter together (the plain path
  checkpoints them separately, which stores the residual stream twice per block).
- **Fused LoRA**: ``y = base(x); y += s · (x Aᵀ) Bᵀ`` as one in-place ``addmm_`` (the GEMM
  accumulates into the base output) instead of peft's separate matmul, scale and add; the same
  peft parameters, so checkpoints are unchanged. Falls back to the peft module for anything but one
  plain adapter (dropout, DoRA, merged or disabled adapters, mixed dtypes outside autocast).
- **Leaner glue**: the per-frame control embedding is added by broadcasting (no repeat_interleave),
  the adapter's layer norm runs on the activations' dtype (fp32 statistics either way), and the
  output head only sees target tokens (reference outputs are dropped anyway).
- **Attention backend** (``attention``): torch's scaled-dot-product attention is asked to prefer
  cuDNN, FlashAttention or memory-efficient attention (others stay as fall-backs), inside each
  checkpoint unit so that the recomputation in the backward pass picks the same kernel.
- **Saved attention** (``save_attention``): under gradient checkpointing, the first N blocks keep
  their self-attention output and log-sum-exp (selective activation checkpointing), so the backward
  pass recomputes everything of those blocks but the attention: B·L·dim·2 bytes more per block.
- **Compile** (``compile``): ``torch.compile`` of the block unit (one graph serves every block). With
  gradient checkpointing the checkpointed unit is compiled whole (``compile_scope="checkpoint"``), so
  the compiler plans the recomputation and applies ``save_attention`` inside the graph (eagerly,
  selective checkpointing intercepts every op in Python and costs more than it saves); traced, the
  fused LoRA's in-place accumulate is written out of place (a traced in-place op adds a copy).
- **Offloaded activations** (``offload_activations``): what the compiled checkpointed units keep for
  the backward pass (their inputs, saved attention outputs) waits in pinned host memory, copied on a
  side stream (:class:`ActivationOffload`): with ``save_attention``, the attention is not recomputed
  and the peak memory stays below that of recomputing everything on the GPU.

All of it computes the same function: differences are rounding (bf16 order of operations, attention
kernels' accumulation order), measured at real shapes by benchmarks/generator_speed.py.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from liftavatar.errors import ConfigError

ATTENTION_CHOICES = ("default", "cudnn", "flash", "efficient", "math")


@dataclass
class SpeedConfig:
    """How LiftAvatarTransformer runs its forward pass (not saved with the prior: a runtime choice)."""

    fast_path: bool = False
    """Run the blocks through :func:`block_unit` (see the module docstring). Off: the plain path."""
    attention: str = "default"
    """Preferred scaled-dot-product-attention backend: default (torch's choice), cudnn, flash,
    efficient or math; the others stay enabled as fall-backs for shapes the preferred one rejects."""
    save_attention: int = 0
    """With gradient checkpointing: the first N blocks keep their self-attention outputs."""
    compile: bool | str = False
    """torch.compile the block unit (True: inductor; a string names another backend)."""
    offload_activations: int = 0
    """With compile (scope ``checkpoint``) and gradient checkpointing: what the first N blocks keep for
    the backward pass (their inputs, saved attention outputs) waits in pinned host memory instead of on
    the GPU, copied out on a side stream during the forward pass and back one block ahead during the
    backward pass (:class:`ActivationOffload`). Bit-identical results; GPU memory for more saving. The
    last blocks are the first the backward pass needs: keeping them avoids waiting for their copies."""
    compile_scope: str = "checkpoint"
    """With compile and gradient checkpointing: ``checkpoint`` compiles the checkpointed unit, so the
    compiler plans the recomputation (and ``save_attention`` is applied inside the graph); ``unit``
    compiles the block unit alone and checkpoints around the compiled call."""

    def __post_init__(self) -> None:
        if self.attention not in ATTENTION_CHOICES:
            raise ConfigError(f"attention={self.attention!r}: use one of {', '.join(ATTENTION_CHOICES)}.")
        if self.save_attention < 0 or self.offload_activations < 0:
            raise ConfigError(f"save_attention={self.save_attention}, offload_activations={self.offload_activations}: "
                              "use a number of blocks, 0 or more.")
        if not self.fast_path and (self.attention != "default" or self.save_attention or self.compile):
            raise ConfigError("attention, save_attention and compile act on the fast path: "
                              "set fast_path=True as well.")
        if self.compile_scope not in ("checkpoint", "unit"):
            raise ConfigError(f"compile_scope={self.compile_scope!r}: use checkpoint or unit.")
        if self.offload_activations and not (self.compile and self.compile_scope == "checkpoint"):
            raise ConfigError("offload_activations needs compile=True with compile_scope='checkpoint' "
                              "(only the compiled checkpoint hands its saved tensors to the offload hooks).")
        if self.compile and self.save_attention and self.compile_scope == "unit":
            raise ConfigError("save_attention with compile needs compile_scope='checkpoint'.")

    @classmethod
    def fast(cls, **overrides: Any) -> SpeedConfig:
        """The fast path, cuDNN attention preferred (flash / efficient where cuDNN declines a shape)."""
        return cls(**{"fast_path": True, "attention": "cudnn", **overrides})


# ---- attention backends ------------------------------------------------------------------------

def attention_context(name: str):
    """A context in which ``F.scaled_dot_product_attention`` prefers backend ``name``."""
    if name == "default":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    table = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = table[name]
    order = [first] + [b for b in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                                   SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH) if b != first]
    try:
        return sdpa_kernel(order, set_priority=True)
    except TypeError:  # a torch without priorities: all fused backends stay on, in torch's own order
        return sdpa_kernel(order)


def _sdpa_ops() -> set:
    names = ("_scaled_dot_product_flash_attention", "_scaled_dot_product_cudnn_attention",
             "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu")
    ops = set()
    for name in names:
        try:
            ops.add(getattr(torch.ops.aten, name).default)
        except (AttributeError, RuntimeError):
            pass
    return ops


@lru_cache(maxsize=None)
def save_attention_context(min_keys: int):
    """``context_fn`` for ``torch.utils.checkpoint``: keep the outputs of fused attention calls with at
    least ``min_keys`` keys (the block's self-attention, not the small cross-attentions); recompute the rest."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    ops = _sdpa_ops()

    def policy(ctx, op, *args, **kwargs):
        if op in ops and args[1].shape[-2] >= min_keys:
            return CheckpointPolicy.MUST_SAVE
        return CheckpointPolicy.PREFER_RECOMPUTE

    return partial(create_selective_checkpoint_contexts, policy)


# ---- activation offload --------------------------------------------------------------------------

def _dense(t: torch.Tensor) -> bool:
    try:
        from torch._prims_common import is_non_overlapping_and_dense

        return is_non_overlapping_and_dense(t)
    except ImportError:  # pragma: no cover - older torch
        return t.is_contiguous()


class _Offloaded:
    __slots__ = ("host", "device", "device_copy", "ready", "unit", "nbytes")

    def __init__(self, host: torch.Tensor, device: torch.device, unit: int):
        self.host, self.device, self.device_copy, self.ready, self.unit = host, device, None, None, unit
        self.nbytes = host.numel() * host.element_size()


class ActivationOffload:
    """Saved-tensor hooks that park large activations in pinned host memory during the forward pass.

    Written by hand: torch's ``save_on_cpu`` copies synchronously and brings every tensor back only when
    the backward pass asks for it, stalling the GPU on each copy. Here copies run on a side stream: out as
    soon as a tensor is saved (the caching allocator keeps its GPU memory until the copy has finished),
    and back for unit ``u - 1`` as soon as the backward pass unpacks unit ``u``, so each copy overlaps
    a block's compute. Parameters, shared inputs, tensors under ``min_bytes``, views at an offset and
    whatever is saved while ``unit`` is None stay where they are. Strides are kept (compiled backward
    graphs assume them). On a CPU model the "host" copy is a plain clone, so the
    bookkeeping can be tested without a GPU.

    Use: ``with offload.hooks(kept): ...`` around the forward pass, ``offload.unit = i`` before unit ``i``
    (None: keep what it saves).
    """

    def __init__(self, min_bytes: int = 1 << 20):
        self.min_bytes = min_bytes
        self.kept_storages: set[int] = set()
        self.unit = 0
        self.pending: dict[int, list[_Offloaded]] = {}
        self.stream = None
        self.offloaded_bytes = 0

    def hooks(self, kept):
        """The saved-tensor hooks for one forward pass. ``kept``: tensors never offloaded (the model's
        parameters, inputs every block shares), so each lives on the GPU once and crosses no bus."""
        self.kept_storages = {t.untyped_storage().data_ptr() for t in kept if isinstance(t, torch.Tensor)}
        self.pending.clear()
        self.unit = 0
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, t: torch.Tensor):
        if (t.numel() * t.element_size() < self.min_bytes or not _dense(t) or t.storage_offset()
                or t.untyped_storage().data_ptr() in self.kept_storages or self.unit is None):
            return t
        if t.device.type == "cuda":
            if self.stream is None:
                self.stream = torch.cuda.Stream(t.device)
            host = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                host.copy_(t, non_blocking=True)
            t.record_stream(self.stream)  # its memory is reused only after the copy
        else:
            host = t.detach().clone()
        item = _Offloaded(host, t.device, self.unit)
        self.pending.setdefault(self.unit, []).append(item)
        self.offloaded_bytes += item.nbytes
        return item

    def _fetch(self, item: _Offloaded) -> None:
        device = item.device
        if device.type != "cuda":
            item.device_copy = item.host
            return
        with torch.cuda.stream(self.stream):
            copy = torch.empty_strided(item.host.size(), item.host.stride(), dtype=item.host.dtype, device=device)
            copy.copy_(item.host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        item.device_copy, item.ready = copy, event

    def unpack(self, item):
        if not isinstance(item, _Offloaded):
            return item
        if item.device_copy is None:
            self._fetch(item)
        # The rest of this unit, then the unit the backward pass reaches next.
        for waiting in self.pending.pop(item.unit, []) + self.pending.pop(item.unit - 1, []):
            if waiting.device_copy is None and waiting is not item:
                self._fetch(waiting)
        out, event = item.device_copy, item.ready
        if isinstance(event, torch.cuda.Event):
            stream = torch.cuda.current_stream(out.device)
            stream.wait_event(event)
            out.record_stream(stream)
        item.device_copy, item.ready = None, None
        return out


# ---- LoRA ----------------------------------------------------------------------------------------

def _plain_adapter(module: nn.Module) -> str | None:
    """The name of the one vanilla LoRA adapter active on a peft ``Linear``, or None to fall back."""
    if getattr(module, "disable_adapters", True) or getattr(module, "merged", True):
        return None
    active = module.active_adapters
    if len(active) != 1:
        return None
    name = active[0]
    if name not in module.lora_A or name in getattr(module, "lora_variant", {}):
        return None
    if getattr(module, "use_dora", {}).get(name, False) or module.lora_B[name].bias is not None:
        return None
    if not isinstance(module.lora_dropout[name], nn.Identity):
        return None
    return name


def lora_linear(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)`` for an ``nn.Linear`` or a peft LoRA ``Linear``, the LoRA update fused into one GEMM."""
    base = getattr(module, "base_layer", None)
    if not isinstance(base, nn.Linear) or not hasattr(module, "lora_A"):
        return module(x)
    name = _plain_adapter(module)
    if name is None:
        return module(x)
    a, b = module.lora_A[name].weight, module.lora_B[name].weight
    autocast = x.device.type in ("cuda", "cpu") and torch.is_autocast_enabled(x.device.type)
    if not autocast and not (x.dtype == base.weight.dtype == a.dtype == b.dtype):
        return module(x)
    y = F.linear(x, base.weight, base.bias)
    xa = F.linear(x, a)
    out = y.view(-1, y.shape[-1])
    xa, bt = xa.reshape(-1, xa.shape[-1]).to(y.dtype), b.t().to(y.dtype)
    if torch.compiler.is_compiling():  # a traced in-place update becomes an out-of-place one plus a copy
        return torch.addmm(out, xa, bt, alpha=module.scaling[name]).view(y.shape)
    out.addmm_(xa, bt, alpha=module.scaling[name])
    return y


# ---- the block -----------------------------------------------------------------------------------

def _rotary(hidden: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """diffusers' Wan rotary embedding, verbatim."""
    x1, x2 = hidden.unflatten(-1, (-1, 2)).unbind(-1)
    cos = freqs_cos[..., 0::2]
    sin = freqs_sin[..., 1::2]
    out = torch.empty_like(hidden)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(hidden)


def _plain_processor(attn: nn.Module) -> bool:
    processor = getattr(attn, "processor", None)
    return (type(processor).__name__ == "WanAttnProcessor" and getattr(processor, "_attention_backend", None) is None
            and getattr(attn, "add_k_proj", None) is None and not getattr(attn, "fused_projections", False))


def attention(attn: nn.Module, x: torch.Tensor, context: torch.Tensor | None, rotary=None) -> torch.Tensor:
    """``WanAttention`` (self-attention when ``context`` is None) with the LoRA projections fused."""
    if not _plain_processor(attn):
        return attn(x, context, None, rotary)
    source = x if context is None else context
    q = attn.norm_q(lora_linear(attn.to_q, x))
    k = attn.norm_k(lora_linear(attn.to_k, source))
    v = lora_linear(attn.to_v, source)
    q, k, v = (t.unflatten(2, (attn.heads, -1)) for t in (q, k, v))
    if rotary is not None:
        q, k = _rotary(q, *rotary), _rotary(k, *rotary)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    out = out.transpose(1, 2).flatten(2, 3).type_as(q)
    return attn.to_out[1](lora_linear(attn.to_out[0], out))


def feed_forward(ffn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diffusers ``FeedForward`` (GELU projection, dropout, linear) with the LoRA projections fused."""
    net = ffn.net
    first = net[0]
    if type(first).__name__ != "GELU" or not hasattr(first, "proj"):
        return ffn(x)
    hidden = F.gelu(lora_linear(first.proj, x), approximate=first.approximate)
    for module in list(net)[1:]:
        hidden = lora_linear(module, hidden) if isinstance(module, nn.Linear) or hasattr(module, "base_layer") \
            else module(hidden)
    return hidden


def block_forward(block: nn.Module, hidden: torch.Tensor, context: torch.Tensor, modulation: torch.Tensor,
                  rotary) -> torch.Tensor:
    """``WanTransformerBlock.forward`` with the timestep modulation given per group of tokens.

    A second copy of diffusers' block, kept beside the plain path (LiftAvatarTransformer.forward calls the
    block itself) because its savings are measured on a GPU only; tests/generator/test_speed_paths.py holds
    the two paths equal, so a change to one must be made to the other (and to diffusers' version it follows).

    Args:
        hidden: (B, L, dim) tokens, L = G groups of equal size (latent frames).
        context: (B, S, dim) embedded text states.
        modulation: (B, G, 6, dim) the condition embedder's timestep projection per group.
        rotary: the base model's (cos, sin) rotary tables.
    """
    b, length, dim = hidden.shape
    groups = modulation.shape[1]
    shift, scale, gate, c_shift, c_scale, c_gate = (block.scale_shift_table.unsqueeze(0)
                                                    + modulation.float()).chunk(6, dim=2)  # (B, G, 1, dim) each

    def grouped(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, groups, length // groups, dim)

    def flat(t: torch.Tensor) -> torch.Tensor:
        return t.view(b, length, dim)

    norm = flat(grouped(block.norm1(hidden.float())) * (1 + scale) + shift).type_as(hidden)
    out = attention(block.attn1, norm, None, rotary)
    hidden = flat(grouped(hidden.float()) + grouped(out) * gate).type_as(hidden)

    norm = block.norm2(hidden.float()).type_as(hidden)
    hidden = hidden + attention(block.attn2, norm, context)

    norm = flat(grouped(block.norm3(hidden.float())) * (1 + c_scale) + c_shift).type_as(hidden)
    out = feed_forward(block.ffn, norm)
    # bf16 · fp32 promotes exactly (as out.float() would) and leaves only `out` saved for backward
    return flat(grouped(hidden.float()) + grouped(out) * c_gate).type_as(hidden)


def adapter_forward(adapter: nn.Module, hidden: torch.Tensor, controls: torch.Tensor, frames: int) -> torch.Tensor:
    """``hidden`` plus the ControlCrossAttention output: each frame's tokens attend to its controls.

    hidden (B, L, dim) with L = frames · tokens per frame; controls (B · frames, G, control_width)."""
    b, length, dim = hidden.shape
    n = b * frames
    tokens = hidden.view(n, length // frames, dim)
    heads = adapter.heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(n, t.shape[1], heads, -1).transpose(1, 2)

    normed = F.layer_norm(tokens, (dim,), eps=adapter.norm.eps)  # fp32 statistics in any input dtype
    q = split(adapter.to_q(normed))
    k, v = split(adapter.to_k(controls)), split(adapter.to_v(controls))
    out = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype))
    delta = adapter.to_out(out.transpose(1, 2).reshape(n, tokens.shape[1], -1))
    return hidden + delta.view(b, length, dim).to(hidden.dtype)


def block_unit(block: nn.Module, adapter: nn.Module | None, hidden: torch.Tensor, context: torch.Tensor,
               modulation: torch.Tensor, rotary, frames: int, controls: torch.Tensor | None) -> torch.Tensor:
    """One transformer block and its control adapter: the unit that is checkpointed and compiled."""
    hidden = block_forward(block, hidden, context, modulation, rotary)
    if adapter is not None:
        hidden = adapter_forward(adapter, hidden, controls, frames)
    return hidden


@lru_cache(maxsize=None)
def checkpointed_unit(save_attention_keys: int = 0):
    """:func:`block_unit` under non-reentrant activation checkpointing, keeping self-attention outputs
    with at least ``save_attention_keys`` keys (0: keep nothing). Compiled whole, the compiler sees the
    recomputation and the saving policy instead of a black box. One function per setting, so that
    torch.compile sees the policy as a constant (it cannot trace a policy passed as an argument)."""
    if not save_attention_keys:
        return partial(checkpoint, block_unit, use_reentrant=False)
    context_fn = save_attention_context(save_attention_keys)

    def unit(*args):
        return checkpoint(block_unit, *args, use_reentrant=False, context_fn=context_fn)

    return unit


def run_unit(unit, attention_backend: str, *args) -> torch.Tensor:
    """``unit(*args)`` with the preferred attention backend (inside checkpointing, so recompute matches)."""
    with attention_context(attention_backend):
        return unit(*args)


# ---- FLOPs ---------------------------------------------------------------------------------------

def wan_forward_flops(config: dict[str, Any], tokens: int, text_tokens: int, lora_rank: int = 0,
                      batch: int = 1) -> float:
    """Model FLOPs of one ``WanTransformer3DModel`` forward pass (one multiply-add = 2 FLOPs).

    With d = heads · head_dim, f = ffn_dim, L video tokens, S text tokens, per block:

    - linears on video tokens: 2 · L · (4d² [self-attention q, k, v, o] + 2d² [cross-attention q, o] + 2df [FFN])
    - linears on text tokens: 2 · S · 2d² [cross-attention k, v]
    - self-attention: 4 · L² · d (Q·Kᵀ and P·V, 2 · L² · d each); cross-attention: 4 · L · S · d
    - LoRA of rank r on those projections: 2 · r · (in + out) per projection and token

    plus the patch embedding (2 · L · d · c · p), the text embedder (2 · S · (text_dim · d + d²)), the
    timestep embedder (2 · (freq_dim · d + d² + 6d²), once per sample) and the output head
    (2 · L · d · c · p). Elementwise work (norms, modulation, RoPE, softmax) is not
    counted. A training step is counted as 3 × this (backward = 2 × forward, the usual convention;
    recomputation under checkpointing is not counted: model FLOPs, not hardware FLOPs).
    """
    d = config["num_attention_heads"] * config["attention_head_dim"]
    f, layers = config["ffn_dim"], config["num_layers"]
    patch = 1
    for p in config["patch_size"]:
        patch *= p
    L, S = tokens, text_tokens
    per_block = (2 * L * (6 * d * d + 2 * d * f) + 2 * S * 2 * d * d + 4 * L * L * d + 4 * L * S * d)
    if lora_rank:
        r = lora_rank
        per_block += 2 * r * (L * (4 * 2 * d + 2 * 2 * d + 2 * (d + f)) + S * 2 * 2 * d)
    io = 2 * L * d * config["in_channels"] * patch + 2 * L * d * config["out_channels"] * patch
    text = 2 * S * (config["text_dim"] * d + d * d)
    time = 2 * (config["freq_dim"] * d + d * d + 6 * d * d)
    return float(batch * (layers * per_block + io + text + time))
