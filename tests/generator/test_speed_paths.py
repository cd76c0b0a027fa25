"""The fast forward path (liftavatar/generator/speed.py) computes what the plain path computes.

Tiny preset, fp32, CPU: every optimised path against the plain one, outputs and gradients.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from liftavatar.errors import ConfigError
from liftavatar.generator.codec import PixelCodec
from liftavatar.generator.pipeline import GenerationInputs, LiftAvatarPipeline
from liftavatar.generator.speed import ActivationOffload, SpeedConfig, lora_linear, wan_forward_flops
from liftavatar.generator.transformer import LiftAvatarTransformer

D = 43


def _model(injection="both", lora=True, moved=True):
    """A tiny model whose zero-initialised modules (and LoRA B) are moved, so every path matters."""
    model = LiftAvatarTransformer.from_preset("tiny", D, injection)
    if lora:
        model.add_lora(rank=4)
    if moved:
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            for _, p in model.zero_initialised_parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _inputs(b=2, t=3, k=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x, shading, controls = r(b, 48, t, 8, 8), r(b, 48, t, 8, 8), r(b, t, 1, D)
    refs = (r(b, 48, k, 8, 8), r(b, 48, k, 8, 8), r(b, k, 1, D)) if k else ()
    return x, torch.tensor([700.0, 30.0][:b]), shading, controls, refs


@pytest.mark.parametrize("injection", ["add", "xattn", "both"])
@pytest.mark.parametrize("refs", [0, 2])
def test_fast_path_output_equals_plain_path(injection, refs):
    model = _model(injection).eval()
    x, t, shading, controls, ref_args = _inputs(k=refs)
    drop = torch.tensor([False, True])
    with torch.no_grad():
        for kwargs in ({}, {"drop_controls": drop}, {"drop_coefficients": drop}):
            model.set_speed()
            plain = model(x, t, shading, controls, *ref_args, **kwargs)
            model.set_speed(fast_path=True)
            fast = model(x, t, shading, controls, *ref_args, **kwargs)
            assert fast.shape == plain.shape
            torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)


def test_fast_path_without_references_equals_the_base_model_exactly():
    model = _model(lora=False, moved=False).eval()
    model.set_speed(fast_path=True)
    x, t, shading, controls, _ = _inputs(k=0)
    prompt = model.prompt_embedding.unsqueeze(0).expand(2, -1, -1)
    with torch.no_grad():
        assert torch.equal(model(x, t, shading, controls), model.base(x, t, prompt, return_dict=False)[0])


def _step(model, speed: SpeedConfig):
    model.set_speed(speed)
    model.zero_grad(set_to_none=True)
    x, t, shading, controls, refs = _inputs()
    out = model(x, t, shading, controls, *refs)
    out.square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("speed", [SpeedConfig(fast_path=True),
                                   SpeedConfig(fast_path=True, attention="flash", save_attention=2),
                                   SpeedConfig(fast_path=True, attention="math", save_attention=1)],
                         ids=["fast", "flash+save2", "math+save1"])
def test_fast_path_gradients_equal_plain_path_under_checkpointing(speed):
    model = _model()
    model.enable_gradient_checkpointing()
    out_plain, grads_plain = _step(model, SpeedConfig())
    out_fast, grads_fast = _step(model, speed)
    torch.testing.assert_close(out_fast, out_plain, rtol=0, atol=1e-5)
    assert grads_fast.keys() == grads_plain.keys()
    assert any("lora_A" in n for n in grads_fast) and any("control_xattn" in n for n in grads_fast)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_fast[name], grad, rtol=1e-5, atol=1e-7, msg=name)


class _CountAttention(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.forward_calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name and "backward" not in name:
            self.forward_calls += 1
        return func(*args, **(kwargs or {}))


def test_saved_attention_is_not_recomputed_in_the_backward_pass():
    model = _model()
    model.enable_gradient_checkpointing()
    blocks = len(model.base.blocks)
    x, t, shading, controls, refs = _inputs()
    counts = {}
    for save in (0, blocks):
        model.set_speed(fast_path=True, save_attention=save)
        out = model(x, t, shading, controls, *refs)
        with _CountAttention() as mode:
            out.square().mean().backward()
        counts[save] = mode.forward_calls
    # per block three attentions are recomputed (self, text, control adapter); saved: only the self-attention
    assert counts[0] == 3 * blocks
    assert counts[blocks] == 2 * blocks


@pytest.mark.parametrize("speed", [SpeedConfig(fast_path=True, compile="aot_eager", compile_scope="unit"),
                                   SpeedConfig(fast_path=True, compile="aot_eager"),
                                   SpeedConfig(fast_path=True, compile="aot_eager", save_attention=1)],
                         ids=["unit", "checkpoint", "checkpoint+save1"])
def test_compiled_block_unit_matches_eager(speed):
    model = _model()
    model.enable_gradient_checkpointing()
    out_plain, grads_plain = _step(model, SpeedConfig())
    out_compiled, grads_compiled = _step(model, speed)
    torch.testing.assert_close(out_compiled, out_plain, rtol=0, atol=1e-5)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(grads_compiled[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_lora_linear_is_the_peft_layer_or_falls_back_to_it():
    model = _model()
    layer = model.base.blocks[0].ffn.net[0].proj
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        torch.testing.assert_close(lora_linear(layer, x), layer(x), rtol=0, atol=1e-6)
        linear = torch.nn.Linear(6, 4)  # a plain linear goes through unchanged
        y = torch.randn(3, 6)
        assert torch.equal(lora_linear(linear, y), linear(y))
        model.base.disable_adapters()  # disabled adapters: the peft module's own answer (the base layer)
        assert torch.equal(lora_linear(layer, x), layer.base_layer(x))
        model.base.enable_adapters()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights under autocast: fused, bf16 out
            fused, reference = lora_linear(layer, x), layer(x)
        assert fused.dtype == reference.dtype == torch.bfloat16
        torch.testing.assert_close(fused.float(), reference.float(), rtol=2e-2, atol=2e-2)


def test_speed_config_rejects_what_it_cannot_do():
    with pytest.raises(ConfigError):
        SpeedConfig(attention="cudnn")  # needs the fast path
    with pytest.raises(ConfigError):
        SpeedConfig(fast_path=True, attention="triton")
    with pytest.raises(ConfigError):
        SpeedConfig(fast_path=True, compile=True, compile_scope="unit", save_attention=2)
    with pytest.raises(ConfigError):
        SpeedConfig(fast_path=True, compile=True, compile_scope="graph")
    assert SpeedConfig.fast().attention == "cudnn"
    model = _model(lora=False, moved=False)
    assert model.speed == SpeedConfig()
    model.set_speed(SpeedConfig.fast(), save_attention=1)
    assert model.speed.fast_path and model.speed.save_attention == 1
    assert model.set_speed() == SpeedConfig()
    assert "speed" not in str(model.state_dict().keys())


def test_pipeline_samples_the_same_frames_on_the_fast_path():
    model = _model().eval()
    g = torch.Generator().manual_seed(3)
    inputs = GenerationInputs(ref_frames=torch.rand(2, 3, 32, 32, generator=g),
                              ref_shading=torch.rand(2, 3, 32, 32, generator=g),
                              ref_controls=torch.randn(2, D, generator=g),
                              shading=torch.rand(5, 3, 32, 32, generator=g), controls=torch.randn(5, D, generator=g))
    plain = LiftAvatarPipeline(model, PixelCodec(4), window=4)(inputs, steps=3, guidance=2.0, solver="unipc")
    fast = LiftAvatarPipeline(model, PixelCodec(4), window=4, speed=SpeedConfig(fast_path=True))(
        inputs, steps=3, guidance=2.0, solver="unipc")
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-5)


def test_forward_flops_formula_matches_the_flop_counter():
    model = _model(moved=False)
    base = model.base
    x, t = torch.randn(1, 48, 3, 8, 8), torch.tensor([500.0])
    prompt = torch.randn(1, 7, base.config.text_dim)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        base(x, t, prompt)
    tokens = 3 * (8 // 2) * (8 // 2)
    assert counter.get_total_flops() == wan_forward_flops(dict(base.config), tokens, 7, lora_rank=4)


def test_fast_path_under_autocast_stays_within_bf16_rounding_of_the_plain_path():
    """The trainer's mixed precision: fp32 weights, bf16 compute. The fused LoRA rounds once where peft
    rounds three times, so the paths differ by bf16 rounding, not more."""
    model = _model()
    x, t, shading, controls, refs = _inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.set_speed()
        plain = model(x, t, shading, controls, *refs).float()
        model.set_speed(fast_path=True)
        fast = model(x, t, shading, controls, *refs).float()
    with torch.no_grad():
        model.set_speed()
        reference = model(x, t, shading, controls, *refs)
    bf16_error = (plain - reference).norm() / reference.norm()
    assert (fast - plain).norm() / reference.norm() <= 2 * bf16_error
    assert (fast - reference).norm() / reference.norm() <= 2 * bf16_error


def test_offloaded_activations_give_the_same_gradients():
    model = _model()
    model.enable_gradient_checkpointing()
    out_plain, grads_plain = _step(model, SpeedConfig())
    speed = SpeedConfig(fast_path=True, compile="aot_eager", save_attention=1, offload_activations=1)
    model.set_speed(speed)
    model._offload = ActivationOffload(min_bytes=0)  # the tiny preset's activations are small: offload all
    model.zero_grad(set_to_none=True)
    x, t, shading, controls, refs = _inputs()
    out = model(x, t, shading, controls, *refs)
    offload = model._offload
    assert len(model.base.blocks) > 1
    assert list(offload.pending) == [0] and offload.offloaded_bytes > 0  # only the first block offloads
    out.square().mean().backward()
    assert not any(offload.pending.values())  # every unit was brought back by the backward pass
    torch.testing.assert_close(out.detach(), out_plain, rtol=0, atol=1e-5)
    for name, grad in grads_plain.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, rtol=1e-5, atol=1e-7, msg=name)
    with pytest.raises(ConfigError):
        SpeedConfig(fast_path=True, offload_activations=1)  # needs the compiled checkpoint


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_offloaded_activations_on_the_gpu_give_the_same_gradients():
    model = _model().cuda()
    model.enable_gradient_checkpointing()
    x, t, shading, controls, refs = (v.cuda() if torch.is_tensor(v) else [r.cuda() for r in v] for v in _inputs())
    grads = {}
    for offload in (0, len(model.base.blocks)):
        model.set_speed(fast_path=True, compile="aot_eager", save_attention=1, offload_activations=offload)
        if offload:
            model._offload = ActivationOffload(min_bytes=0)
        model.zero_grad(set_to_none=True)
        model(x, t, shading, controls, *refs).square().mean().backward()
        grads[offload] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert model._offload.offloaded_bytes > 0
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[len(model.base.blocks)][name], grad, rtol=1e-5, atol=1e-6, msg=name)
