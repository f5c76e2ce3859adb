"""bf16 equivalence of the fast path at the release's shapes, on a GPU (compiled kernels).

Skipped without CUDA: on CPU the same kernels run under the Triton interpreter at small,
odd shapes (test_fast_path.py, test_kernels_*.py). `bench/gpu_session.sh` runs this file
first on a lent GPU machine."""
import copy

import pytest
import torch

import fastground
from fastground import GroundingGPT, GroundingGPTConfig
from fastground.testing import with_token_ids
from test_fast_path import compare
from tolerances import REL_TOL, rel_err

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="release-shape equivalence of the compiled kernels needs a CUDA GPU")

STAGE3_BATCH = 8


def release_slice(dtype):
    """Every branch at release width; one decoder layer, one encoder block (not exercised)."""
    cfg = with_token_ids(GroundingGPTConfig.from_preset("groundinggpt-7b", num_hidden_layers=1, eva_depth=1,
                                                        clip_num_layers=1, audio_num_blocks=1))
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = GroundingGPT(cfg).model
    ref = ref.to(device="cuda", dtype=dtype).eval()
    fast = copy.deepcopy(ref)
    fastground.patch(fast)
    return cfg, ref, fast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_video_branch_release_shapes(dtype):
    cfg, ref, fast = release_slice(dtype)
    feats = torch.randn(STAGE3_BATCH, cfg.num_frames, cfg.num_query_token, cfg.qformer_hidden_size,
                        device="cuda").to(dtype)
    compare(ref, fast, "video", feats, None, dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_audio_branch_release_shapes(dtype):
    cfg, ref, fast = release_slice(dtype)
    feats = torch.randn(STAGE3_BATCH, cfg.num_audio_clips, cfg.audio_out_dim, device="cuda").to(dtype)
    compare(ref, fast, "audio", feats, None, dtype)


def test_image_adapter_release_shapes():
    cfg, ref, fast = release_slice(torch.bfloat16)
    x = torch.randn(STAGE3_BATCH, cfg.image_token_len, cfg.clip_hidden_size, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        exact = copy.deepcopy(ref.mm_vision_projector).double()(x.double())
        out_ref = ref.mm_vision_projector(x)
        out_fast = fast.mm_vision_projector(x)
    assert rel_err(out_fast, exact) <= max(REL_TOL[torch.bfloat16], 1.5 * rel_err(out_ref, exact))
