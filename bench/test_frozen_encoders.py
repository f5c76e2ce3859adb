"""What the feature cache takes out of every step: the frozen encoders' forward per sample
(EVA ViT-g + ln_vision + frame Q-Former on 64 frames, CLIP ViT-L on one 336 px image,
ImageBind on 3 clips: variant "media", at full depth on a GPU) against reading the same
sample's stored features from a `fastground.features` cache and moving them to the device
(variant "cache"). A stage-1 step from media is the step from features
(bench/test_train_step.py) plus the batch times the "media" rows. FLOPs counted by torch's
FlopCounterMode on the call itself; the floor is those FLOPs over the measured matmul rate,
or the weights read once over the copy rate, whichever is larger."""
import pytest
import torch

from bench import floors, harness

MODALITIES = ("video", "image", "sound")


@pytest.fixture(scope="module")
def encoders(fg):
    """The frozen half of each branch at the release's depth (the shared slice model keeps
    them at depth 1), one LLM layer beside them."""
    from fastground import GroundingGPT
    from fastground.config import GroundingGPTConfig
    from fastground.testing import with_token_ids
    if fg.gpu:
        cfg = GroundingGPTConfig.from_preset("groundinggpt-7b", num_hidden_layers=1)
    else:
        cfg = GroundingGPTConfig.from_preset("tiny")
    cfg = with_token_ids(cfg)
    torch.manual_seed(0)
    with torch.device(fg.device):
        m = GroundingGPT(cfg)
    m = m.to(device=fg.device, dtype=fg.dtype).eval()
    yield cfg, m
    del m
    harness.free_memory(fg.device)


def _media(cfg, modality, fg, seed):
    if modality == "video":
        return fg.randn(1, 3, cfg.num_frames, cfg.eva_image_size, cfg.eva_image_size, seed=seed)
    if modality == "image":
        return fg.randn(1, 3, cfg.clip_image_size, cfg.clip_image_size, seed=seed)
    return fg.randn(1, cfg.num_audio_clips, 1, cfg.audio_num_mel_bins, cfg.audio_target_len, seed=seed)


def _encode(model, modality, x):
    from fastground.features import encode
    return encode(model, modality, x)


def _weights_bytes(model, modality) -> int:
    inner = model.model
    mods = {"video": (inner.visual_encoder, inner.ln_vision, inner.Qformer), "image": (inner.vision_tower,),
            "sound": (inner.audio_encoder,)}[modality]
    return sum(p.numel() * p.element_size() for m in mods for p in m.parameters())


@pytest.mark.fg_cpu
@pytest.mark.parametrize("modality", MODALITIES)
@pytest.mark.parametrize("variant", ("media", "cache"))
def test_frozen_encoders(benchmark, fg, encoders, modality, variant, tmp_path):
    from torch.utils.flop_counter import FlopCounterMode
    cfg, model = encoders
    inputs = [(_media(cfg, modality, fg, seed=i + 1),) for i in range(2)]
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        feats = _encode(model, modality, inputs[0][0])
    cost = floors.Cost(flops=float(counter.get_total_flops()),
                       bytes=float(_weights_bytes(model, modality) + inputs[0][0].numel() * fg.itemsize))
    if variant == "media":
        def call(x):
            with torch.no_grad():
                return _encode(model, modality, x)
    else:
        from fastground.data.feature_cache import CacheSpec, FeatureCache
        cache = FeatureCache.create_or_open(str(tmp_path / "cache"), CacheSpec("bench", str(fg.dtype), {}, 0, 1))
        cache.write_shard(0, [(modality, f"s{i}", "v", "c", feats[0].cpu().clone()) for i in range(len(inputs))])
        keys = iter(range(10**9))
        cost = floors.Cost(flops=0.0, bytes=float(feats.numel() * feats.element_size()))

        def call(x):
            got = cache.get(modality, f"s{next(keys) % len(inputs)}", "v")
            return got.to(fg.device, non_blocking=True)
    info = harness.CaseInfo(bench="frozen_encoders", variant=variant, mode=modality, batch=1,
                            shape=f"{tuple(inputs[0][0].shape)} -> {tuple(feats.shape)}",
                            dtype=str(fg.dtype).replace("torch.", ""), cost=cost, items_per_call=1)
    fig = harness.run_case(benchmark, fg, info, call, inputs, warmup=2)
    benchmark.extra_info.update(fig)
