"""Frozen encoders: EVA ViT-g (video branch) and ImageBind-huge audio (sound branch).

Key names and shapes are checked against the release's naming rules at full size on the
meta device (no memory); the math is checked on tiny instances against hand-written
einsum references that share no code with the modules.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from fastground import GroundingGPTConfig
from fastground.model.eva_vit import EVAVisionTransformer, load_eva_weights, resize_pos_embed
from fastground.model.imagebind_audio import (ImageBindAudioEncoder, is_audio_key,
                                              load_imagebind_audio_weights)


@pytest.fixture(scope="module")
def tiny():
    return GroundingGPTConfig.from_preset("tiny")


@pytest.fixture(scope="module")
def full():
    return GroundingGPTConfig.from_preset("groundinggpt-7b")


def _nparams(m):
    return sum(p.numel() for p in m.parameters())


def _randomize(module, seed=0, std=0.2):
    """Non-trivial values everywhere (zero biases and unit norms would hide wiring bugs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in module.state_dict().items():
            if name.endswith("log_logit_scale"):
                continue
            t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * std
                    + (1.0 if name.endswith("norm1.weight") or name.endswith("norm2.weight") else 0.0))


def _gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _heads(x, h):
    b, n, d = x.shape
    return x.reshape(b, n, h, d // h)


# =========================================================================== EVA ViT-g
EVA_BLOCK_KEYS = [
    "norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight",
    "attn.proj.weight", "attn.proj.bias", "norm2.weight", "norm2.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
]


def test_eva_release_layout_on_meta(full):
    with torch.device("meta"):
        m = EVAVisionTransformer.from_config(full)
    sd = m.state_dict()
    expected = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    expected += [f"blocks.{i}.{k}" for i in range(39) for k in EVA_BLOCK_KEYS]
    assert sorted(sd) == sorted(expected)
    assert len(sd) == 4 + 39 * 13
    assert len(m.blocks) == 39 and m.num_features == 1408
    shapes = {
        "cls_token": (1, 1, 1408), "pos_embed": (1, 257, 1408),
        "patch_embed.proj.weight": (1408, 3, 14, 14), "patch_embed.proj.bias": (1408,),
        "blocks.38.attn.qkv.weight": (4224, 1408), "blocks.38.attn.q_bias": (1408,),
        "blocks.38.attn.v_bias": (1408,), "blocks.0.attn.proj.weight": (1408, 1408),
        "blocks.0.mlp.fc1.weight": (6144, 1408), "blocks.0.mlp.fc2.weight": (1408, 6144),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert m.blocks[0].attn.head_dim == 88
    assert m.blocks[0].attn.qkv.bias is None
    assert all(b.norm1.eps == 1e-6 and b.norm2.eps == 1e-6 for b in m.blocks)
    assert 0.95e9 <= _nparams(m) <= 1.05e9


def test_eva_forward_shape(tiny):
    torch.manual_seed(0)
    m = EVAVisionTransformer.from_config(tiny).eval()
    out = m(torch.randn(2, 3, 56, 56))
    assert out.shape == (2, 1 + 16, 48)
    with pytest.raises(ValueError, match="56x56"):
        m(torch.randn(1, 3, 42, 42))


def _eva_reference(sd, images, depth, heads, patch, eps=1e-6):
    """EVA forward from the state dict alone, attention written out with einsum."""
    x = F.conv2d(images, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd["cls_token"].expand(x.shape[0], -1, -1), x], dim=1) + sd["pos_embed"]
    d = x.shape[-1]
    for i in range(depth):
        p = {k: sd[f"blocks.{i}.{k}"] for k in EVA_BLOCK_KEYS}
        h = F.layer_norm(x, (d,), p["norm1.weight"], p["norm1.bias"], eps)
        wq, wk, wv = p["attn.qkv.weight"].chunk(3)
        q = _heads(h @ wq.T + p["attn.q_bias"], heads)
        k = _heads(h @ wk.T, heads)  # no key bias
        v = _heads(h @ wv.T + p["attn.v_bias"], heads)
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // heads)
        o = torch.einsum("bhqk,bkhe->bqhe", s.softmax(-1), v).flatten(2)
        x = x + o @ p["attn.proj.weight"].T + p["attn.proj.bias"]
        h = F.layer_norm(x, (d,), p["norm2.weight"], p["norm2.bias"], eps)
        x = x + _gelu(h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    return x


def test_eva_matches_einsum_reference(tiny):
    m = EVAVisionTransformer.from_config(tiny).double().eval()
    _randomize(m, seed=1)
    images = torch.randn(2, 3, 56, 56, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    ref = _eva_reference(m.state_dict(), images, tiny.eva_depth, tiny.eva_num_heads, tiny.eva_patch_size)
    with torch.no_grad():
        out = m(images)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_eva_attention_matches_einsum(tiny):
    m = EVAVisionTransformer.from_config(tiny).double()
    _randomize(m, seed=3)
    attn = m.blocks[0].attn
    x = torch.randn(3, 7, tiny.eva_width, dtype=torch.float64)
    wq, wk, wv = attn.qkv.weight.chunk(3)
    q, k, v = (_heads(t, attn.num_heads) for t in (x @ wq.T + attn.q_bias, x @ wk.T, x @ wv.T + attn.v_bias))
    a = (torch.einsum("bqhe,bkhe->bhqk", q, k) * attn.head_dim ** -0.5).softmax(-1)
    ref = torch.einsum("bhqk,bkhe->bqhe", a, v).flatten(2) @ attn.proj.weight.T + attn.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(attn(x), ref, rtol=1e-10, atol=1e-10)


def test_eva_is_deterministic_in_either_mode(tiny):
    torch.manual_seed(0)
    m = EVAVisionTransformer.from_config(tiny)
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a = m.eval()(x)
        b = m.eval()(x)
        c = m.train()(x)  # drop_path 0 and no dropout: training mode changes nothing
    assert torch.equal(a, b) and torch.equal(a, c)


def test_eva_weights_roundtrip_and_errors(tiny, tmp_path):
    torch.manual_seed(0)
    src = EVAVisionTransformer.from_config(tiny).eval()
    sd = dict(src.state_dict())
    # BLIP-2's release load is strict=False; EVA's own final norm/head must not break it.
    sd["norm.weight"] = torch.ones(tiny.eva_width)
    sd["head.weight"] = torch.zeros(3, tiny.eva_width)
    path = tmp_path / "eva_vit_g.pth"
    torch.save(sd, path)

    dst = EVAVisionTransformer.from_config(tiny).eval()
    info = load_eva_weights(dst, path)
    assert info == {"loaded": len(src.state_dict()), "ignored": ["head.weight", "norm.weight"],
                    "pos_embed_resized": False}
    x = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))

    broken = dict(src.state_dict())
    del broken["blocks.1.attn.v_bias"]
    bad = tmp_path / "broken.pth"
    torch.save(broken, bad)
    with pytest.raises(KeyError, match=r"broken\.pth.*missing 1 key\(s\): blocks\.1\.attn\.v_bias"):
        load_eva_weights(dst, bad)

    broken = dict(src.state_dict(), **{"blocks.0.attn.relative_position_bias_table": torch.zeros(3)})
    torch.save(broken, bad)
    with pytest.raises(KeyError, match=r"broken\.pth.*unexpected 1 key\(s\): blocks\.0\.attn\.relative"):
        load_eva_weights(dst, bad)

    broken = dict(src.state_dict(), **{"blocks.0.mlp.fc1.bias": torch.zeros(5)})
    torch.save(broken, bad)
    with pytest.raises(ValueError, match=r"broken\.pth: shape mismatch.*blocks\.0\.mlp\.fc1\.bias"):
        load_eva_weights(dst, bad)

    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_eva_weights(dst, tmp_path / "nope.pth")


def test_eva_pos_embed_resized_on_load(tiny, tmp_path):
    torch.manual_seed(0)
    src = EVAVisionTransformer.from_config(tiny)  # 56 px / 14 -> 4x4 grid
    sd = dict(src.state_dict())
    pe = torch.randn(1, 17, tiny.eva_width)
    pe[:, 1:] = 0.25  # a constant field stays constant under bicubic resizing
    sd["pos_embed"] = pe
    path = tmp_path / "eva_vit_g.pth"
    torch.save(sd, path)

    dst = EVAVisionTransformer.from_config(tiny.replace(eva_image_size=42))  # 3x3 grid
    info = load_eva_weights(dst, path)
    assert info["pos_embed_resized"]
    assert dst.pos_embed.shape == (1, 10, tiny.eva_width)
    torch.testing.assert_close(dst.pos_embed[:, :1], pe[:, :1], rtol=0, atol=0)
    torch.testing.assert_close(dst.pos_embed[:, 1:], torch.full((1, 9, tiny.eva_width), 0.25))

    ramp = torch.arange(16.0).reshape(1, 16, 1).expand(1, 16, 2)
    grown = resize_pos_embed(torch.cat([torch.zeros(1, 1, 2), ramp], 1), 64)
    assert grown.shape == (1, 65, 2)
    ref = F.interpolate(ramp.reshape(1, 4, 4, 2).permute(0, 3, 1, 2), size=(8, 8), mode="bicubic",
                        align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 2)
    torch.testing.assert_close(grown[:, 1:], ref)
    with pytest.raises(ValueError, match="not square"):
        resize_pos_embed(torch.zeros(1, 1 + 15, 2), 16)


# =========================================================================== ImageBind audio
AUDIO_BLOCK_KEYS = [
    "attn.in_proj_weight", "attn.in_proj_bias", "attn.bias_k", "attn.bias_v",
    "attn.out_proj.weight", "attn.out_proj.bias", "norm_1.weight", "norm_1.bias",
    "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias",
    "norm_2.weight", "norm_2.bias",
]
AUDIO_OTHER_KEYS = [
    "modality_preprocessors.audio.cls_token",
    "modality_preprocessors.audio.rgbt_stem.proj.0.weight",
    "modality_preprocessors.audio.rgbt_stem.norm_layer.weight",
    "modality_preprocessors.audio.rgbt_stem.norm_layer.bias",
    "modality_preprocessors.audio.pos_embedding_helper.pos_embed",
    "modality_heads.audio.0.weight",
    "modality_heads.audio.0.bias",
    "modality_heads.audio.2.weight",
    "modality_postprocessors.audio.1.log_logit_scale",
]


def test_audio_release_layout_on_meta(full):
    with torch.device("meta"):
        m = ImageBindAudioEncoder.from_config(full)
    sd = m.state_dict()
    expected = AUDIO_OTHER_KEYS + [f"modality_trunks.audio.blocks.{i}.{k}"
                                   for i in range(12) for k in AUDIO_BLOCK_KEYS]
    assert sorted(sd) == sorted(expected)
    assert len(sd) == 9 + 12 * 14
    assert all(is_audio_key(k) for k in sd)
    pre = "modality_preprocessors.audio."
    shapes = {
        pre + "cls_token": (1, 1, 768),
        pre + "rgbt_stem.proj.0.weight": (768, 1, 16, 16),
        pre + "pos_embedding_helper.pos_embed": (1, 1 + 12 * 19, 768),
        "modality_trunks.audio.blocks.11.attn.in_proj_weight": (2304, 768),
        "modality_trunks.audio.blocks.11.attn.bias_k": (1, 1, 768),
        "modality_trunks.audio.blocks.11.mlp.fc1.weight": (3072, 768),
        "modality_heads.audio.2.weight": (1024, 768),
        "modality_postprocessors.audio.1.log_logit_scale": (),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert m.modality_preprocessors["audio"].rgbt_stem.proj[0].bias is None
    assert m.modality_preprocessors["audio"].rgbt_stem.norm_layer.eps == 1e-5
    assert m.modality_heads["audio"][0].eps == 1e-6
    assert m.modality_heads["audio"][2].bias is None
    trunk = m.modality_trunks["audio"]
    assert all(b.norm_1.eps == 1e-6 and b.norm_2.eps == 1e-6 for b in trunk.blocks)
    assert 85e6 <= _nparams(trunk) <= 90e6
    rates = [getattr(b.drop_path, "p", 0.0) for b in trunk.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1)
    assert all(r2 > r1 for r1, r2 in zip(rates, rates[1:]))


def _audio_input(tiny, b=2, s=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, s, 1, tiny.audio_num_mel_bins, tiny.audio_target_len, generator=g)


def test_audio_shapes_and_logit_scale(tiny):
    torch.manual_seed(0)
    m = ImageBindAudioEncoder.from_config(tiny).eval()
    x = _audio_input(tiny)
    with torch.no_grad():
        feature, final = m.get_audio_feature(x)
        again = m(x)
        single_f, single = m.get_audio_feature(x[0])  # (S, 1, mel, frames): no clip axis
    assert feature.shape == (2, 3, tiny.audio_embed_dim)
    assert final.shape == (2, 3, tiny.audio_out_dim)
    torch.testing.assert_close(final.norm(dim=-1), torch.full((2, 3), 20.0))
    assert torch.equal(again, final)  # eval mode: no stochastic depth
    assert single.shape == (3, tiny.audio_out_dim)
    torch.testing.assert_close(single, final[0])
    torch.testing.assert_close(single_f, feature[0])
    # The feature is the head's LayerNorm output (unit LN at init): zero mean per clip.
    torch.testing.assert_close(feature.mean(-1), torch.zeros(2, 3), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="fbank input"):
        m(torch.randn(1, 1, 1, tiny.audio_num_mel_bins, 100))


def _audio_reference(sd, x, depth, heads, kernel, stride):
    """ImageBind audio from the state dict alone, batch-first, attention with einsum and the
    learned bias_k / bias_v appended as one extra key/value slot."""
    p0 = "modality_preprocessors.audio."
    t = F.conv2d(x, sd[p0 + "rgbt_stem.proj.0.weight"], None, stride=stride).flatten(2).transpose(1, 2)
    d = t.shape[-1]
    t = F.layer_norm(t, (d,), sd[p0 + "rgbt_stem.norm_layer.weight"], sd[p0 + "rgbt_stem.norm_layer.bias"], 1e-5)
    t = torch.cat([sd[p0 + "cls_token"].expand(t.shape[0], -1, -1), t], 1)
    t = t + sd[p0 + "pos_embedding_helper.pos_embed"]
    for i in range(depth):
        p = {k: sd[f"modality_trunks.audio.blocks.{i}.{k}"] for k in AUDIO_BLOCK_KEYS}
        h = F.layer_norm(t, (d,), p["norm_1.weight"], p["norm_1.bias"], 1e-6)
        wq, wk, wv = p["attn.in_proj_weight"].chunk(3)
        bq, bk, bv = p["attn.in_proj_bias"].chunk(3)
        n = t.shape[0]
        k = torch.cat([h @ wk.T + bk, p["attn.bias_k"].reshape(1, 1, d).expand(n, 1, d)], 1)
        v = torch.cat([h @ wv.T + bv, p["attn.bias_v"].reshape(1, 1, d).expand(n, 1, d)], 1)
        q, k, v = _heads(h @ wq.T + bq, heads), _heads(k, heads), _heads(v, heads)
        assert k.shape[1] == h.shape[1] + 1
        s = torch.einsum("bqhe,bkhe->bhqk", q, k) / math.sqrt(d // heads)
        o = torch.einsum("bhqk,bkhe->bqhe", s.softmax(-1), v).flatten(2)
        t = t + o @ p["attn.out_proj.weight"].T + p["attn.out_proj.bias"]
        h = F.layer_norm(t, (d,), p["norm_2.weight"], p["norm_2.bias"], 1e-6)
        t = t + _gelu(h @ p["mlp.fc1.weight"].T + p["mlp.fc1.bias"]) @ p["mlp.fc2.weight"].T + p["mlp.fc2.bias"]
    feature = F.layer_norm(t, (d,), sd["modality_heads.audio.0.weight"], sd["modality_heads.audio.0.bias"], 1e-6)[:, 0]
    out = feature @ sd["modality_heads.audio.2.weight"].T
    scale = sd["modality_postprocessors.audio.1.log_logit_scale"].exp().clamp(max=100)
    return feature, scale * out / out.norm(dim=-1, keepdim=True)


def test_audio_matches_einsum_reference(tiny):
    m = ImageBindAudioEncoder.from_config(tiny).double().eval()
    _randomize(m, seed=4)
    x = _audio_input(tiny, b=1, s=2, seed=5).double()
    ref_f, ref = _audio_reference(m.state_dict(), x.flatten(0, 1), tiny.audio_num_blocks,
                                  tiny.audio_num_heads, tiny.audio_kernel_size, tiny.audio_stride)
    with torch.no_grad():
        feature, final = m.get_audio_feature(x)
    torch.testing.assert_close(feature, ref_f.reshape(1, 2, -1), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, ref.reshape(1, 2, -1), rtol=1e-10, atol=1e-10)


def test_audio_bias_kv_adds_one_key(tiny):
    m = ImageBindAudioEncoder.from_config(tiny)
    attn = m.modality_trunks["audio"].blocks[0].attn
    x = torch.randn(5, 2, tiny.audio_embed_dim)  # (L, B, D): sequence first, as ImageBind runs it
    _, w = attn(x, x, x, need_weights=True, average_attn_weights=False)
    assert w.shape == (2, tiny.audio_num_heads, 5, 6)
    # Pin the scores: every query is all ones, every projected key zero, so each real key
    # scores 0 and the bias_k slot scores log(5): weights 1/10 each and 5/10 for the slot.
    d, h = tiny.audio_embed_dim, tiny.audio_num_heads
    hd = d // h
    with torch.no_grad():
        attn.in_proj_weight[: 2 * d].zero_()
        attn.in_proj_bias[:d].fill_(1.0)
        attn.in_proj_bias[d: 2 * d].zero_()
        attn.bias_k.fill_(math.log(5.0) * math.sqrt(hd) / hd)
        _, w = attn(x, x, x, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(w[..., :5], torch.full((2, h, 5, 5), 0.1))
    torch.testing.assert_close(w[..., 5], torch.full((2, h, 5), 0.5))


def test_audio_drop_path_is_train_only_and_per_position(tiny):
    torch.manual_seed(0)
    m = ImageBindAudioEncoder.from_config(tiny.replace(audio_drop_path=0.5))
    x = _audio_input(tiny, b=1, s=1).expand(2, 1, -1, -1, -1)  # two identical samples
    with torch.no_grad():
        e1, e2 = m.eval()(x), m(x)
        torch.manual_seed(1)
        t = m.train()(x)
    assert torch.equal(e1, e2)
    assert not torch.allclose(t, e1)
    # ImageBind drops residual branches per token position of its (L, B, D) trunk, shared by
    # the whole batch, so identical samples stay identical even in training mode.
    torch.testing.assert_close(t[0], t[1])


def test_audio_weights_from_full_imagebind(tiny, tmp_path):
    torch.manual_seed(0)
    src = ImageBindAudioEncoder.from_config(tiny).eval()
    full_sd = dict(src.state_dict())
    full_sd["modality_trunks.vision.x"] = torch.zeros(3)
    full_sd["modality_heads.text.proj.0.weight"] = torch.zeros(2)
    path = tmp_path / "imagebind_huge.pth"
    torch.save(full_sd, path)

    dst = ImageBindAudioEncoder.from_config(tiny).eval()
    info = load_imagebind_audio_weights(dst, path)
    assert info["loaded"] == len(src.state_dict())
    assert info["ignored"] == 2
    assert sorted(info["ignored_keys"]) == ["modality_heads.text.proj.0.weight", "modality_trunks.vision.x"]
    x = _audio_input(tiny, b=1, s=2)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))

    # The same weights as they sit inside a release checkpoint.
    prefixed = {f"model.audio_encoder.{k}": v for k, v in full_sd.items()}
    prefixed["model.llama_proj.weight"] = torch.zeros(2)
    torch.save(prefixed, tmp_path / "release.pth")
    info = load_imagebind_audio_weights(ImageBindAudioEncoder.from_config(tiny), tmp_path / "release.pth",
                                        prefix="model.audio_encoder.")
    assert info["ignored"] == 3


def test_audio_weight_errors_name_the_file(tiny, tmp_path):
    src = ImageBindAudioEncoder.from_config(tiny)
    sd = dict(src.state_dict())
    del sd["modality_trunks.audio.blocks.1.attn.bias_v"]
    path = tmp_path / "imagebind_huge.pth"
    torch.save(sd, path)
    with pytest.raises(KeyError, match=r"imagebind_huge\.pth.*missing 1 key\(s\): "
                                       r"modality_trunks\.audio\.blocks\.1\.attn\.bias_v"):
        load_imagebind_audio_weights(src, path)

    sd = dict(src.state_dict(), **{"modality_trunks.audio.blocks.7.norm_1.weight": torch.ones(32)})
    torch.save(sd, path)
    with pytest.raises(KeyError, match=r"unexpected 1 key\(s\): modality_trunks\.audio\.blocks\.7"):
        load_imagebind_audio_weights(src, path)

    sd = dict(src.state_dict(), **{"modality_heads.audio.2.weight": torch.zeros(7, 32)})
    torch.save(sd, path)
    with pytest.raises(ValueError, match=r"imagebind_huge\.pth: shape mismatch.*modality_heads\.audio\.2\.weight"):
        load_imagebind_audio_weights(src, path)

    torch.save({"modality_trunks.vision.x": torch.zeros(1)}, path)
    with pytest.raises(KeyError, match=r"imagebind_huge\.pth: no ImageBind audio keys"):
        load_imagebind_audio_weights(src, path)
