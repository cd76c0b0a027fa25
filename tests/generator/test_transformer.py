import json

import pytest
import torch
from safetensors.torch import save_file

from liftavatar.errors import ConfigError
from liftavatar.generator.transformer import (
    BASE_PRESETS,
    LORA_TARGETS,
    LiftAvatarTransformer,
    TransformerConfig,
    group_controls,
    load_wan_base,
)

D = 43  # 37 expression coefficients + 6 pose


def _inputs(b=2, c=48, t=3, hw=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return r(b, c, t, hw, hw), torch.tensor([700.0, 30.0][:b]), r(b, c, t, hw, hw), r(b, t, 1, D)


@pytest.mark.parametrize("injection", ["add", "xattn", "both"])
def test_zero_init_without_references_equals_base_exactly(injection):
    model = LiftAvatarTransformer.from_preset("tiny", D, injection).eval()
    x, t, shading, controls = _inputs()
    prompt = model.prompt_embedding.unsqueeze(0).expand(2, -1, -1)
    with torch.no_grad():
        base = model.base(x, t, prompt, return_dict=False)[0]
        for seed in range(3):  # whatever the controls and shading maps
            _, _, shading, controls = _inputs(seed=seed + 1)
            drop = torch.tensor([False, seed % 2 == 1])
            assert torch.equal(model(x, t, shading, controls, drop_controls=drop), base)


def test_controls_and_references_matter_once_trained_modules_move():
    model = LiftAvatarTransformer.from_preset("tiny", D, "both").eval()
    x, t, shading, controls = _inputs()
    refs = torch.randn(2, 48, 2, 8, 8)
    ref_controls = torch.randn(2, 2, 1, D)
    with torch.no_grad():
        plain = model(x, t, shading, controls)
        with_refs = model(x, t, shading, controls, refs, refs, ref_controls)
        assert with_refs.shape == plain.shape  # reference outputs are dropped
        assert not torch.allclose(with_refs, plain)  # targets attend to the references
        for module in (model.shading_embedding, model.control_to_tokens, model.control_xattn[0].to_out):
            torch.nn.init.normal_(module.weight, std=0.02)
        moved = model(x, t, shading, controls)
        other = model(x, t, shading, controls + 1.0)
    assert not torch.allclose(moved, plain)
    assert not torch.allclose(moved, other)


def test_single_control_ablations_drop_exactly_one_control():
    """drop_coefficients ignores the expression coefficients but still reads the shading maps;
    drop_controls ignores both (the inference-time ablations of the control study)."""
    model = LiftAvatarTransformer.from_preset("tiny", D, "both").eval()
    for module in (model.shading_embedding, model.control_to_tokens, model.control_xattn[0].to_out):
        torch.nn.init.normal_(module.weight, std=0.02)
    x, t, shading, controls = _inputs()
    yes = torch.ones(2, dtype=torch.bool)
    with torch.no_grad():
        shading_only = model(x, t, shading, controls, drop_coefficients=yes)
        assert torch.equal(shading_only, model(x, t, shading, controls + 1.0, drop_coefficients=yes))
        assert not torch.allclose(shading_only, model(x, t, shading + 1.0, controls, drop_coefficients=yes))
        assert not torch.allclose(shading_only, model(x, t, shading, controls))
        dropped = model(x, t, shading, controls, drop_controls=yes)
        assert torch.equal(dropped, model(x, t, shading + 1.0, controls + 1.0, drop_controls=yes))


def test_reference_tokens_get_timestep_zero():
    """Changing the target timestep must not change how clean references are embedded: with the
    per-token timestep, a reference-only difference shows up in the output only through attention."""
    model = LiftAvatarTransformer.from_preset("tiny", D).eval()
    seen = {}
    model.base.condition_embedder.register_forward_hook(lambda m, args, out: seen.update(t=args[0].clone()))
    x, t, shading, controls = _inputs(b=1)
    refs = torch.randn(1, 48, 2, 8, 8)
    with torch.no_grad():
        model(x, t[:1], shading, controls, refs, refs, torch.randn(1, 2, 1, D))
    per_token = seen["t"].view(1, -1)
    tokens_per_frame = 16
    assert torch.all(per_token[:, :2 * tokens_per_frame] == 0)
    assert torch.all(per_token[:, 2 * tokens_per_frame:] == 700.0)


def test_lora_targets_only_the_named_projections():
    model = LiftAvatarTransformer.from_preset("tiny", D)
    model.add_lora(rank=4)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    base_trainable = [n for n in trainable if n.startswith("base.")]
    assert base_trainable and all("lora_" in n for n in base_trainable)
    wrapped = {n.split(".lora_")[0].removeprefix("base.") for n in base_trainable}
    assert all(any(name.endswith(target) for target in LORA_TARGETS) for name in wrapped)
    # every block's attention (self and cross) and FFN projections got one
    blocks = BASE_PRESETS["tiny"]["num_layers"]
    assert len(wrapped) == blocks * (2 * 4 + 2)
    assert not any("condition_embedder" in n or "patch_embedding" in n or "proj_out" in n for n in wrapped)
    # the LiftAvatar modules train; the base's own weights are frozen
    assert {"shading_embedding.weight", "prompt_embedding", "null_control"} <= set(trainable)
    assert not model.base.blocks[0].attn1.to_q.base_layer.weight.requires_grad


def test_group_controls_follows_the_wan_vae_frame_groups():
    controls = torch.arange(9, dtype=torch.float32).view(1, 9, 1)
    grouped = group_controls(controls, 4)
    assert grouped.shape == (1, 3, 4, 1)
    assert grouped[0, :, :, 0].tolist() == [[0, 0, 0, 0], [1, 2, 3, 4], [5, 6, 7, 8]]
    assert group_controls(controls, 1).shape == (1, 9, 1, 1)


def test_small_preset_fits_the_embedded_prior_budget():
    with torch.device("meta"):
        model = LiftAvatarTransformer(TransformerConfig.from_preset("small", D))
    assert model.num_parameters() <= 30_000_000


def test_real_presets_match_the_published_shapes():
    with torch.device("meta"):
        model = LiftAvatarTransformer(TransformerConfig.from_preset("wan2.1-1.3b", D))
    base = sum(p.numel() for p in model.base.parameters())
    assert 1.3e9 < base < 1.5e9  # Wan2.1-T2V-1.3B: 1.42 B parameters


def _original_keys(state):
    """diffusers WanTransformer3DModel keys → the original Wan2.1 checkpoint's (inverse of diffusers' converter)."""
    renames = [("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
               ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
               ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
               ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
               ("condition_embedder.time_proj", "time_projection.1"), ("attn2", "cross_attn"), ("attn1", "self_attn"),
               (".to_out.0.", ".o."), (".to_q.", ".q."), (".to_k.", ".k."), (".to_v.", ".v."),
               ("ffn.net.0.proj", "ffn.0"), ("ffn.net.2", "ffn.2"), ("proj_out", "head.head"), (".norm2.", ".norm3.")]
    out = {}
    for key, value in state.items():
        new = key
        for a, b in renames:
            new = new.replace(a, b)
        if new == "scale_shift_table":
            new = "head.modulation"
        elif new.endswith("scale_shift_table"):
            new = new.replace("scale_shift_table", "modulation")
        out["model.diffusion_model." + new] = value.contiguous()
    return out


def test_base_loads_from_a_diffusers_directory_and_an_original_single_file(tmp_path):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    config = dict(BASE_PRESETS["tiny"])
    reference = WanTransformer3DModel(**config).eval()
    reference.save_pretrained(tmp_path / "diffusers")
    single = tmp_path / "single"
    single.mkdir()
    save_file(_original_keys(reference.state_dict()), str(single / "wan_tiny.safetensors"))
    (single / "config.json").write_text((tmp_path / "diffusers" / "config.json").read_text())

    x = torch.randn(1, 48, 2, 8, 8)
    prompt = torch.randn(1, 4, config["text_dim"])
    t = torch.tensor([500.0])
    with torch.no_grad():
        expected = reference(x, t, prompt, return_dict=False)[0]
        for path in (tmp_path / "diffusers", single / "wan_tiny.safetensors"):
            loaded = load_wan_base(path).eval()
            own = loaded.state_dict()
            assert own.keys() == reference.state_dict().keys()
            assert all(torch.equal(own[k], v) for k, v in reference.state_dict().items()), path
            torch.testing.assert_close(loaded(x, t, prompt, return_dict=False)[0], expected)

    wrapped = LiftAvatarTransformer.from_base(tmp_path / "diffusers", D)
    assert wrapped.config.base_path == str((tmp_path / "diffusers").resolve())
    assert torch.equal(wrapped.base.blocks[0].attn1.to_q.weight, reference.blocks[0].attn1.to_q.weight)


def test_missing_or_unusable_base_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_wan_base(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        load_wan_base(tmp_path / "empty")
    (tmp_path / "ckpt.safetensors").write_bytes(b"")
    with pytest.raises(ConfigError, match="config.json beside it"):
        load_wan_base(tmp_path / "ckpt.safetensors")


def test_save_and_load_round_trip_and_shape_errors(tmp_path):
    model = LiftAvatarTransformer.from_preset("tiny", D, seed=3)
    model.save_pretrained(tmp_path / "prior")
    loaded = LiftAvatarTransformer.from_pretrained(tmp_path / "prior")
    want, got = model.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()  # zip() over the two would stop silently at the shorter one
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # a prior whose weights are of another shape than its config says
    cfg = json.loads((tmp_path / "prior" / "config.json").read_text())
    cfg["base"]["ffn_dim"] = 256
    (tmp_path / "prior" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="another shape"):
        LiftAvatarTransformer.from_pretrained(tmp_path / "prior")
    with pytest.raises(ConfigError, match="no such directory"):
        LiftAvatarTransformer.from_pretrained(tmp_path / "missing")


def test_lora_prior_saves_only_the_adapter_and_reloads_on_its_base(tmp_path):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(1)
    WanTransformer3DModel(**BASE_PRESETS["tiny"]).save_pretrained(tmp_path / "base")
    model = LiftAvatarTransformer.from_base(tmp_path / "base", D)
    model.add_lora(rank=4)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(tmp_path / "prior")
    assert not (tmp_path / "prior" / "model.safetensors").exists()
    loaded = LiftAvatarTransformer.from_pretrained(tmp_path / "prior").eval()
    x, t, shading, controls = _inputs(c=48)
    with torch.no_grad():
        assert torch.equal(loaded(x, t, shading, controls), model.eval()(x, t, shading, controls))
    with pytest.raises(ConfigError, match="--base PATH"):
        LiftAvatarTransformer.from_pretrained(tmp_path / "prior", base_path=tmp_path / "gone")


def test_precomputed_prompt_embedding_replaces_the_learned_one(tmp_path):
    model = LiftAvatarTransformer.from_preset("tiny", D)
    embeds = torch.randn(7, BASE_PRESETS["tiny"]["text_dim"])
    save_file({"prompt_embeds": embeds}, str(tmp_path / "prompt.safetensors"))
    model.load_prompt_embedding(tmp_path / "prompt.safetensors")
    assert torch.equal(model.prompt_embedding, embeds) and not model.prompt_embedding.requires_grad
    model.save_pretrained(tmp_path / "prior")
    assert torch.equal(LiftAvatarTransformer.from_pretrained(tmp_path / "prior").prompt_embedding, embeds)
    save_file({"prompt_embeds": torch.randn(7, 5)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConfigError, match="expects"):
        model.load_prompt_embedding(tmp_path / "bad.safetensors")
