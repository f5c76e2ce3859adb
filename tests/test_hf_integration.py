"""AutoModelForCausalLM.from_pretrained on a tiny checkpoint in the release's layout."""
import json
import shutil

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.testing import media_block, media_tensor, with_token_ids


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """Sharded .bin weights with an index, ImageBind's unused modalities and old rotary
    buffers in the state dict, and a config naming the CLIP tower by hub id, as the release
    ships; the tower itself lives elsewhere."""
    root = tmp_path_factory.mktemp("release")
    torch.manual_seed(0)
    model = GroundingGPT(with_token_ids(GroundingGPTConfig.from_preset("tiny")))
    model.save_pretrained(str(root / "ckpt"), safe_serialization=False, max_shard_size="200KB")
    ckpt = root / "ckpt"
    shutil.move(str(ckpt / "vision_tower"), str(root / "clip"))
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["mm_vision_tower"] = "openai/clip-vit-large-patch14-336"
    (ckpt / "config.json").write_text(json.dumps(cfg))
    index = json.loads((ckpt / "pytorch_model.bin.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    first = sorted(set(index["weight_map"].values()))[0]
    shard = torch.load(ckpt / first, weights_only=True)
    extra = {"model.audio_encoder.modality_trunks.vision.blocks.0.attn.in_proj_weight": torch.zeros(3, 3),
             "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(8)}
    shard.update(extra)
    torch.save(shard, ckpt / first)
    index["weight_map"].update({k: first for k in extra})
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return ckpt, root / "clip"


def test_auto_model_loads_release_layout_and_generates_with_media(release_dir):
    import fastground.hf  # noqa: F401  registers model_type "LEGO"
    from transformers import AutoConfig, AutoModelForCausalLM

    ckpt, clip = release_dir
    assert type(AutoConfig.from_pretrained(str(ckpt))).__name__ == "LEGOConfig"
    with pytest.raises(FileNotFoundError, match="vision_tower_path="):
        AutoModelForCausalLM.from_pretrained(str(ckpt))
    ours = GroundingGPT.from_pretrained(str(ckpt), vision_tower_path=str(clip))
    hf = AutoModelForCausalLM.from_pretrained(str(ckpt), vision_tower_path=str(clip), dtype=torch.float32,
                                              device_map="cpu", low_cpu_mem_usage=True)
    assert type(hf).__name__ == "LEGOLlamaForCausalLM" and not hf.training
    a, b = ours.state_dict(), hf.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    cfg = ours.config
    rows = [[1, 5, 6] + media_block(cfg, "image") + [7, 8], [1, 9] + media_block(cfg, "image") + [10]]
    images = media_tensor(cfg, "image", 2, torch.Generator().manual_seed(0))
    want = ours.generate(rows, images=images, max_new_tokens=5).tokens
    from fastground.model.generation import left_pad
    ids, mask = left_pad(rows, 0)
    got = hf.generate(ids, attention_mask=mask, images=images, max_new_tokens=5, do_sample=False,
                      pad_token_id=0, eos_token_id=None)
    assert got[:, ids.shape[1]:].tolist() == want
    bf16 = AutoModelForCausalLM.from_pretrained(str(ckpt), vision_tower_path=str(clip), dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16 and bf16.model.vision_tower.dtype == torch.bfloat16
    out = bf16.generate(ids, attention_mask=mask, images=images, max_new_tokens=2, do_sample=False,
                        pad_token_id=0, eos_token_id=None)
    assert out.shape == (2, ids.shape[1] + 2)
