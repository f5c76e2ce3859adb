"""Every configuration the fused-linear launchers pick at the groundinggpt-7b shapes compiles
for sm_80 and sm_90 (bf16, fp32, fp32 with tf32), fits the chip's shared memory and does not
spill registers.

The configurations are captured, not listed by hand: the public functions run forward and
backward on "meta" tensors inside `aot.record_launches`, which records each launch with the
argument specialisation Triton's JIT would make (16-divisible pointers and sizes get the
divisibility hint that vectorised loads and the cp.async / TMA pipeline depend on; without
it the shared-memory figure would describe a different kernel).
"""
from __future__ import annotations

import pytest
import torch

from fastground.kernels import adapters as ad
from fastground.kernels import aot, runtime
from fastground.kernels import fused_linear as fl
from aot_checks import assert_fits_chip, assert_no_spills, unique_launches

CCS = (80, 90)
SMS = {80: 108, 90: 132}  # A100, H100 SXM
B = 8  # per-GPU batch of the release's stage 3
EXPECTED = {"_gemm_kernel", "_bias_grad_kernel", "_dropout_mask_kernel", "_dropout_res_ln_fwd_kernel",
            "_dropout_res_ln_bwd_kernel", "_sum_partials_kernel"}


def _workloads(dt):
    """The adapters and the Q-Former dense layers at groundinggpt-7b shapes, fwd + bwd."""

    def p(*shape):
        return torch.empty(*shape, device="meta", dtype=dt, requires_grad=True)

    def run(fn, *args):
        out = fn(*args)
        out.backward(torch.empty_like(out))

    # image adapter mm_vision_projector: 576 CLIP tokens per image, 1024 -> 4096 -> GELU -> 4096
    run(ad.mlp_adapter, p(B * 576, 1024), p(4096, 1024), p(4096), p(4096, 4096), p(4096))
    # llama_proj / audio_llama_proj: 64 video queries per sample, 768 -> 4096
    run(ad.projection, p(B * 64, 768), p(4096, 768), p(4096))
    # Q-Former: intermediate_query.dense (768 -> 3072, GELU), output_query (3072 -> 768) and
    # attention.output (768 -> 768) with dropout + residual + LayerNorm, eval and training
    run(fl.linear_gelu, p(B * 64, 768), p(3072, 768), p(3072))
    for k in (3072, 768):
        for training in (False, True):
            run(lambda *a: fl.linear_dropout_residual_layernorm(*a, 1e-12, 0.1, 1234, training),
                p(B * 64, k), p(768, k), p(768), p(B * 64, 768), p(768), p(768))
    fl.dropout_mask(1234, B * 64, 768, 0.1, "meta")
    if dt == torch.bfloat16:  # dropout keys read from the device, as under CUDA-graph capture
        with runtime.device_seeds():
            run(lambda *a: fl.linear_dropout_residual_layernorm(*a, 1e-12, 0.1, None, True),
                p(B * 64, 768), p(768, 768), p(768), p(B * 64, 768), p(768), p(768))


def _release_launches() -> list[aot.Launch]:
    launches = []
    prev_tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        for cc in CCS:
            with aot.record_launches(num_sms=SMS[cc]) as rec:
                for dtype, tf32 in ((torch.bfloat16, False), (torch.float32, False), (torch.float32, True)):
                    torch.backends.cuda.matmul.allow_tf32 = tf32
                    _workloads(dtype)
            launches += rec
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev_tf32
    return unique_launches(launches)


@pytest.fixture(scope="module")
def compiled():
    launches = _release_launches()
    jobs = [launch.job(cc) for launch in launches for cc in CCS]
    rows = []
    for job, (c, smem) in zip(jobs, aot.compile_many(jobs, keep_asm=True)):
        consts = {k: v for k, v in job.constexprs.items() if not k.startswith("stride")}
        types = {k: v for k, v in job.signature.items() if k in ("a_ptr", "c_ptr", "z_ptr")}
        rows.append(dict(kernel=c.name, cc=job.cc, smem=smem, warps=job.num_warps, stages=job.num_stages,
                         consts=consts, types=types, **aot.resource_usage(c)))
    return rows


def test_release_plan_covers_every_kernel():
    launches = _release_launches()
    assert {launch.kernel.fn.__name__ for launch in launches} == EXPECTED
    gemm = [launch.constexprs for launch in launches if launch.kernel.fn.__name__ == "_gemm_kernel"]
    # Big image-adapter GEMMs take the largest tile (never with the GELU epilogue, which
    # spills there), small Q-Former outputs the smallest, fp32 under allow_tf32 the tf32 one.
    assert any(c["BLOCK_M"] == 128 and c["BLOCK_N"] == 256 for c in gemm)
    assert not any(c["BLOCK_N"] == 256 and c["GELU"] for c in gemm)
    assert any(c["BLOCK_M"] == 64 and c["BLOCK_N"] == 64 and c["BLOCK_K"] == 64 for c in gemm)
    assert any(c["PRECISION"] == "tf32" for c in gemm)
    # exact fp32 without the switch: the GEMMs that ran at fp32 with tf32 off
    assert any(c["PRECISION"] == "ieee" and c["BLOCK_K"] == 32 and c["BLOCK_N"] == 64 for c in gemm)


@pytest.mark.parametrize("cc", CCS)
def test_shared_memory_fits(compiled, cc):
    assert_fits_chip(compiled, cc)


@pytest.mark.parametrize("cc", CCS)
def test_no_register_spills(compiled, cc):
    assert_no_spills(compiled, cc)
