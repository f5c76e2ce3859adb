"""The fused Llama ops (kernels/llama_ops.py) compile ahead of time for sm_80 and sm_90 at
the groundinggpt-7b shapes (bf16 and fp32, forward and backward), fit the chip's shared
memory and do not spill registers. Launches are captured on meta tensors, as the other
kernel files' AOT tests do."""
from __future__ import annotations

import pytest
import torch

from fastground.kernels import aot, runtime
from fastground.kernels import llama_ops as lo
from aot_checks import assert_fits_chip, assert_no_spills, unique_launches

CCS = (80, 90)
SMS = {80: 108, 90: 132}
TOKENS, HIDDEN, INTER, HEADS, HEAD_DIM = 2 * 2048, 4096, 11008, 32, 128  # Vicuna-7B, 2 x 2048 tokens


def _workloads(dt):
    def p(*shape):
        return torch.empty(*shape, device="meta", dtype=dt, requires_grad=True)

    y = lo.rms_norm(p(TOKENS, HIDDEN), p(HIDDEN), 1e-6)
    y.backward(torch.empty_like(y))
    y = lo.swiglu(p(TOKENS, INTER), p(TOKENS, INTER))
    y.backward(torch.empty_like(y))
    q = torch.empty(2, 2048, HEADS, HEAD_DIM, device="meta", dtype=dt).transpose(1, 2).requires_grad_()
    cos = torch.empty(1, 2048, HEAD_DIM, device="meta", dtype=dt)
    y = lo.rope(q, cos, cos)
    y.backward(torch.empty_like(y))


def _launches():
    out = []
    for cc in CCS:
        with runtime.record_launches(num_sms=SMS[cc]) as rec:
            for dt in (torch.bfloat16, torch.float32):
                _workloads(dt)
        out += rec
    return unique_launches(out)


@pytest.fixture(scope="module")
def compiled():
    jobs = [launch.job(cc) for launch in _launches() for cc in CCS]
    rows = []
    for job, (c, smem) in zip(jobs, aot.compile_many(jobs, keep_asm=True)):
        consts = {k: v for k, v in job.constexprs.items() if not k.startswith("stride")}
        rows.append(dict(kernel=c.name, cc=job.cc, smem=smem, warps=job.num_warps, stages=job.num_stages,
                         consts=consts, **aot.resource_usage(c)))
    return rows


def test_plan_covers_every_kernel():
    names = {launch.kernel.fn.__name__ for launch in _launches()}
    assert names == {"_rms_fwd_kernel", "_rms_bwd_kernel", "_swiglu_fwd_kernel", "_swiglu_bwd_kernel", "_rope_kernel"}


@pytest.mark.slow
@pytest.mark.parametrize("cc", CCS)
def test_shared_memory_fits(compiled, cc):
    assert_fits_chip(compiled, cc)


@pytest.mark.slow
@pytest.mark.parametrize("cc", CCS)
def test_no_register_spills(compiled, cc):
    assert_no_spills(compiled, cc)
