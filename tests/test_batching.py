"""Several items of one modality in a batch (2-3 images, videos, sounds of different content)
give each item what it gets alone: through the frozen encoders (CLIP, EVA + the frame
Q-Former, ImageBind), the trainable branches and the whole model, forward and backward,
on the reference path and the fast path (Triton under TRITON_INTERPRET=1 on CPU).

A batch of one cannot tell a per-item computation from one that mixes items (frames of
several videos interleaved, clips of several sounds swapped): every case here has >= 2."""
import copy

import pytest
import torch

import fastground
from fastground import GroundingGPT, GroundingGPTConfig
from fastground.testing import media_block, media_tensor, with_token_ids
from tolerances import REL_TOL, REL_TOL_GRAD, rel_err

MODALITIES = ("image", "video", "sound")
ENCODE = {"image": "encode_images", "video": "encode_videos", "sound": "encode_sounds"}
BATCH_KEY = {"image": "images", "video": "videos", "sound": "sounds"}
TRAINABLE = {"image": ("mm_vision_projector.",),
             "video": ("video_Qformer.", "video_query_tokens", "video_frame_position_embedding.", "llama_proj."),
             "sound": ("audio_Qformer.", "audio_query_tokens", "audio_position_embedding.", "audio_llama_proj.")}


@pytest.fixture(scope="module")
def models():
    cfg = with_token_ids(GroundingGPTConfig.from_preset("tiny"))
    torch.manual_seed(0)
    ref = GroundingGPT(cfg).eval()
    # At BERT's initial std the Q-Formers' outputs are their query tokens plus a trace of the
    # media (two different videos differ by 6e-5 after the branch, below the fp32 tolerance);
    # larger cross-attention values make the content count, so a mix-up of items shows.
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "Qformer." in name and "crossattention.self.value.weight" in name:
                p.mul_(30)
    fast = copy.deepcopy(ref)
    fastground.patch(fast)
    return {"reference": ref, "fast": fast}


def items(cfg, modality, n, seed):
    """n media of clearly different content (different seeds and scales)."""
    g = torch.Generator().manual_seed(seed)
    x = media_tensor(cfg, modality, n, g)
    return x * torch.linspace(0.5, 1.5, n).view(-1, *[1] * (x.dim() - 1))


def frozen_features(inner, modality, x):
    if modality == "image":
        with torch.no_grad():
            return inner.vision_tower(x, output_hidden_states=True).hidden_states[inner.gg_config.mm_vision_select_layer]
    return inner.frame_features(x) if modality == "video" else inner.clip_features(x)


@pytest.mark.parametrize("path,modality,n", [
    ("reference", "image", 3), ("reference", "video", 3), ("reference", "sound", 2),
    ("fast", "image", 3), pytest.param("fast", "video", 3, marks=pytest.mark.slow), ("fast", "sound", 2)])
def test_batched_media_equal_each_alone(models, path, modality, n):
    model = models[path]
    inner, cfg = model.model, model.config
    x = items(cfg, modality, n, seed=10 + n)
    # frozen encoder (and, for video, the frame Q-Former) alone
    feats = frozen_features(inner, modality, x)
    for i in range(n):
        err = rel_err(feats[i], frozen_features(inner, modality, x[i:i + 1])[0])
        assert err <= REL_TOL[torch.float32], f"{modality} {i}: frozen features of the batch differ ({err:.2g})"
        if i:
            assert rel_err(feats[i], feats[0]) > 10 * REL_TOL[torch.float32]  # the items really differ
    # the whole branch: forward (both paths), backward (reference; tests/test_fast_path.py
    # compares the fast backward with it on batches of 2-3)
    if path == "fast":
        with torch.no_grad():
            out = getattr(inner, ENCODE[modality])(x)
            for i in range(n):
                err = rel_err(out[i], getattr(inner, ENCODE[modality])(x[i:i + 1])[0])
                assert err <= REL_TOL[torch.float32], f"{modality} {i}: branch output in the batch differs ({err:.2g})"
            ref_out = getattr(models["reference"].model, ENCODE[modality])(x)
        assert rel_err(out, ref_out) <= REL_TOL[torch.float32]
        return
    params = {k: p for k, p in inner.named_parameters() if k.startswith(TRAINABLE[modality])}
    g = torch.randn(n, cfg.media_token_len(modality), cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    out = getattr(inner, ENCODE[modality])(x)
    grads = torch.autograd.grad((out * g).sum(), list(params.values()))
    alone_grads = [torch.zeros_like(p) for p in params.values()]
    for i in range(n):
        one = getattr(inner, ENCODE[modality])(x[i:i + 1])
        err = rel_err(out[i], one[0])
        assert err <= REL_TOL[torch.float32], f"{modality} {i}: branch output in the batch differs ({err:.2g})"
        for acc, gi in zip(alone_grads, torch.autograd.grad((one * g[i:i + 1]).sum(), list(params.values()))):
            acc += gi
    for name, a, b in zip(params, grads, alone_grads):
        if b.norm() > 1e-6 * max(t.norm() for t in alone_grads):  # key biases are ~0: rounding only
            assert rel_err(a, b) <= REL_TOL_GRAD[torch.float32], name


def _sample_ids(cfg, modality, blocks, seed):
    g = torch.Generator().manual_seed(seed)
    words = lambda k: torch.randint(3, cfg.vocab_size - 9, (k,), generator=g).tolist()  # noqa: E731
    ids = [cfg.bos_token_id] + words(3)
    for _ in range(blocks):
        ids += media_block(cfg, modality) + words(2)
    return ids + words(4)


@pytest.mark.parametrize("path,modality", [("reference", "image"), ("reference", "video"), ("reference", "sound"),
                                           pytest.param("fast", "video", marks=pytest.mark.slow)])
def test_whole_model_rows_equal_each_sample_alone(models, path, modality):
    """Three samples, one with two media blocks: 4 media in the batch, spliced in order.
    (The fast path runs every Triton kernel under the interpreter here, so it takes the
    modality whose frozen path has the most to mix up: frames of several videos.)"""
    model = models[path]
    cfg = model.config
    blocks = [1, 2, 1]
    rows = [_sample_ids(cfg, modality, k, seed=i) for i, k in enumerate(blocks)]
    length = max(map(len, rows))
    ids = torch.full((3, length), cfg.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)] = torch.tensor(r), 1
    media = items(cfg, modality, sum(blocks), seed=7)
    with torch.no_grad():
        logits = model(ids, attention_mask=mask, **{BATCH_KEY[modality]: media}).logits
        first = 0
        for i, (r, k) in enumerate(zip(rows, blocks)):
            alone = model(torch.tensor([r]), **{BATCH_KEY[modality]: media[first:first + k]}).logits[0]
            err = rel_err(logits[i, :len(r)], alone)
            assert err <= REL_TOL[torch.float32], f"{modality} sample {i}: logits in the batch differ ({err:.2g})"
            first += k
        if path == "fast":
            return
        # media in the wrong order would be a different function
        swapped = model(ids, attention_mask=mask, **{BATCH_KEY[modality]: media.flip(0)}).logits
        assert rel_err(swapped[0, :len(rows[0])], logits[0, :len(rows[0])]) > 10 * REL_TOL[torch.float32]
