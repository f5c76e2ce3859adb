import json
import os
import sys
from dataclasses import asdict

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.model.checkpoint import read_state_dict, release_state_dict
from fastground.model.stages import parameter_report, set_stage, trainable_parameters
from fastground.testing import media_block, mixed_batch, with_token_ids

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "fixtures"))
from release_keys import TINY_FILE, release_keys  # noqa: E402


@pytest.fixture(scope="module")
def cfg():
    return with_token_ids(GroundingGPTConfig.from_preset("tiny"))


def tiny_model(cfg, seed=0):
    torch.manual_seed(seed)
    return GroundingGPT(cfg)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_mixed_batch_grads_land_on_stage_set(cfg, stage):
    model = tiny_model(cfg)
    trainable = set_stage(model, stage)
    model.train()
    out = model(**mixed_batch(cfg))
    out.loss.backward()
    assert torch.isfinite(out.loss)
    got = {n for n, p in model.named_parameters() if p.grad is not None}
    assert got == set(trainable), (sorted(set(trainable) - got)[:5], sorted(got - set(trainable))[:5])
    assert all(torch.isfinite(p.grad).all() for p in trainable.values())
    # every adapter of every branch gets a real (non-zero) gradient from the mixed batch
    for prefix in ("model.mm_vision_projector.0.weight", "model.llama_proj.weight",
                   "model.audio_llama_proj.weight", "model.video_query_tokens", "model.audio_query_tokens"):
        assert model.get_parameter(prefix).grad.abs().sum() > 0, prefix


def test_stage_sets(cfg):
    model = tiny_model(cfg)
    s1, s2 = trainable_parameters(model, 1), trainable_parameters(model, 2)
    assert set(s1) < set(s2) and set(trainable_parameters(model, 3)) == set(s2)
    assert "model.video_frame_position_embedding.weight" in s1 and "model.audio_position_embedding.weight" in s1
    assert not any(n.startswith(("model.layers.", "lm_head", "model.norm")) for n in s1)
    assert "model.embed_tokens.weight" in s1  # as released: media samples reach only the start/end rows
    assert not any(n.startswith(("model.visual_encoder", "model.Qformer", "model.query_tokens",
                                 "model.audio_encoder", "model.vision_tower", "model.ln_vision")) for n in s2)
    with pytest.raises(ValueError, match="stage must be 1, 2 or 3"):
        trainable_parameters(model, 4)


def test_splice_puts_branch_outputs_at_patch_tokens(cfg):
    model = tiny_model(cfg).eval()
    b = mixed_batch(cfg)
    with torch.no_grad():
        emb = model.embed(b["input_ids"], b["images"], b["videos"], b["sounds"])
        tok = model.model.embed_tokens(b["input_ids"])
        feats = {"image": model.model.encode_images(b["images"]), "video": model.model.encode_videos(b["videos"]),
                 "sound": model.model.encode_sounds(b["sounds"])}
    for row, modality in enumerate(("image", "video", "sound")):
        patch = cfg.token_ids(modality)[0]
        where = (b["input_ids"][row] == patch).nonzero().squeeze(1)
        torch.testing.assert_close(emb[row, where], feats[modality][0])
        other = (b["input_ids"][row] != patch)
        torch.testing.assert_close(emb[row, other], tok[row, other])
    torch.testing.assert_close(emb[3], tok[3])


def test_placeholder_mismatch_names_sample(cfg):
    model = tiny_model(cfg).eval()
    b = mixed_batch(cfg)
    with pytest.raises(ValueError, match="video.*1 <video> blocks.*but 2"):
        model(b["input_ids"], images=b["images"], videos=torch.cat([b["videos"], b["videos"]]), sounds=b["sounds"])
    ids = b["input_ids"].clone()
    patch = cfg.token_ids("sound")[0]
    ids[2, (ids[2] == patch).nonzero()[0]] = 5  # one patch token lost
    with pytest.raises(ValueError, match="sample 2: sound placeholder"):
        model(ids, images=b["images"], videos=b["videos"], sounds=b["sounds"])


def test_frozen_encoders_stay_in_eval(cfg):
    model = tiny_model(cfg).train()
    for name in ("vision_tower", "visual_encoder", "Qformer", "audio_encoder"):
        assert not getattr(model.model, name).training
    assert model.model.video_Qformer.training


def test_7b_on_meta_is_sized_as_released():
    # Speed is measured in bench/, not asserted here; what matters is that nothing is allocated.
    with torch.device("meta"):
        model = GroundingGPT(GroundingGPTConfig.from_preset("groundinggpt-7b"))
    assert all(t.is_meta for t in list(model.parameters()) + list(model.buffers()) if t.is_floating_point())
    r = parameter_report(model)
    assert 6.6e9 < r["backbone (Vicuna)"] < 6.8e9
    assert 0.95e9 < r["EVA ViT-g (video encoder)"] < 1.05e9
    assert 0.29e9 < r["CLIP ViT-L/14 (image encoder)"] < 0.31e9
    assert model.config.image_token_len == 576
    keys = release_state_dict(model)
    assert list(keys["model.video_query_tokens"].shape) == [1, 64, 768]
    assert list(keys["model.Qformer.bert.encoder.layer.10.crossattention.self.key.weight"].shape) == [768, 1408]
    assert "model.Qformer.bert.encoder.layer.11.crossattention.self.key.weight" not in keys
    assert list(keys["model.audio_Qformer.bert.encoder.layer.1.crossattention.self.key.weight"].shape) == [768, 1024]
    assert set(keys) == set(release_keys(asdict(model.config)))


def _write_release_checkpoint(path, cfg, keys, extra=None):
    """A checkpoint as the release would write it: sharded .bin with an index."""
    os.makedirs(path)
    g = torch.Generator().manual_seed(1)
    sd = {}
    for k, shape in keys.items():
        if k.endswith("position_ids"):
            sd[k] = torch.arange(shape[1]).view(1, -1)
        elif k.endswith("log_logit_scale"):
            sd[k] = torch.tensor(20.0).log()
        else:
            sd[k] = torch.randn(shape, generator=g) * 0.02
    sd.update(extra or {})
    names = sorted(sd)
    half = len(names) // 2
    shards = {"pytorch_model-00001-of-00002.bin": names[:half], "pytorch_model-00002-of-00002.bin": names[half:]}
    for f, ks in shards.items():
        torch.save({k: sd[k] for k in ks}, os.path.join(path, f))
    with open(os.path.join(path, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}, f)
    cfg.save(path)
    return sd


def test_release_checkpoint_roundtrip(cfg, tmp_path):
    with open(TINY_FILE) as f:
        listed = json.load(f)["keys"]
    assert listed == release_keys(asdict(GroundingGPTConfig.from_preset("tiny")))  # fixture is current
    extra = {"model.audio_encoder.modality_trunks.vision.blocks.0.attn.in_proj_weight": torch.zeros(3, 3),
             "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(4)}
    written = _write_release_checkpoint(str(tmp_path / "release"), cfg, listed, extra)
    model = GroundingGPT.from_pretrained(str(tmp_path / "release"))
    loaded = release_state_dict(model)
    assert set(loaded) == set(listed)
    for k in listed:
        assert torch.equal(loaded[k], written[k]), k
    model.save_pretrained(str(tmp_path / "ours"), max_shard_size="100KB")
    files = os.listdir(tmp_path / "ours")
    assert "model.safetensors.index.json" in files and "config.json" in files and "vision_tower" in files
    with open(tmp_path / "ours" / "config.json") as f:
        conf = json.load(f)
    assert conf["model_type"] == "LEGO" and conf["video_patch_token"] == cfg.video_patch_token
    resaved = read_state_dict(str(tmp_path / "ours"))
    assert set(resaved) == set(listed)
    again = GroundingGPT.from_pretrained(str(tmp_path / "ours"))
    for k, v in release_state_dict(again).items():
        assert torch.equal(v, written[k]), k
    for (n1, t1), (n2, t2) in zip(model.model.vision_tower.state_dict().items(),
                                  again.model.vision_tower.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    # the reloaded model computes the same function
    b = mixed_batch(cfg)
    model.eval(), again.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**b).logits, again(**b).logits, rtol=0, atol=0)


def test_checkpoint_errors(cfg, tmp_path):
    with open(TINY_FILE) as f:
        listed = json.load(f)["keys"]
    keys = {k: v for k, v in listed.items() if not k.startswith("model.audio_Qformer.")}
    _write_release_checkpoint(str(tmp_path / "bad"), cfg, keys, {"model.surprise.weight": torch.zeros(2)})
    with pytest.raises(ValueError, match=r"bad: checkpoint does not match the model: \d+ missing keys.*audio_Qformer.*"
                                         r"1 unexpected keys \['model.surprise.weight'\]"):
        GroundingGPT.from_pretrained(str(tmp_path / "bad"))
    with pytest.raises(FileNotFoundError, match="nowhere: checkpoint directory not found"):
        GroundingGPT.from_pretrained(str(tmp_path / "nowhere"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        GroundingGPT.from_pretrained(str(tmp_path / "empty"))
    os.makedirs(tmp_path / "corrupt")
    cfg.save(str(tmp_path / "corrupt"))
    (tmp_path / "corrupt" / "model.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="model.safetensors: cannot read weights"):
        GroundingGPT.from_pretrained(str(tmp_path / "corrupt"))


def test_missing_encoders_load_from_their_own_files(cfg, tmp_path):
    with open(TINY_FILE) as f:
        listed = json.load(f)["keys"]
    without = {k: v for k, v in listed.items() if not k.startswith(("model.visual_encoder.", "model.audio_encoder."))}
    _write_release_checkpoint(str(tmp_path / "ckpt"), cfg, without)
    with pytest.raises(ValueError, match="missing keys.*visual_encoder"):
        GroundingGPT.from_pretrained(str(tmp_path / "ckpt"))
    src = tiny_model(cfg, seed=3)
    torch.save(src.model.visual_encoder.state_dict(), tmp_path / "eva_vit_g.pth")
    torch.save({"modality_trunks.vision.blocks.0.attn.bias_k": torch.zeros(1),
                **src.model.audio_encoder.state_dict()}, tmp_path / "imagebind_huge.pth")
    model = GroundingGPT.from_pretrained(str(tmp_path / "ckpt"), eva_path=str(tmp_path / "eva_vit_g.pth"),
                                         imagebind_path=str(tmp_path / "imagebind_huge.pth"))
    for k, v in src.model.visual_encoder.state_dict().items():
        assert torch.equal(model.model.visual_encoder.state_dict()[k], v)
    for k, v in src.model.audio_encoder.state_dict().items():
        assert torch.equal(model.model.audio_encoder.state_dict()[k], v)


def test_config_roundtrip(tmp_path):
    for preset in ("tiny", "groundinggpt-7b"):
        c = GroundingGPTConfig.from_preset(preset)
        c.save(str(tmp_path / preset))
        assert GroundingGPTConfig.load(str(tmp_path / preset)) == c
    with pytest.raises(ValueError, match="unknown preset"):
        GroundingGPTConfig.from_preset("huge")
