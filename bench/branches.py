"""The three trainable branches as bench cases: inputs, cost and one timed run.

A branch case starts from the frozen encoders' features (what the trainable part sees)
and times either inference (`fwd`: eval mode, no autograd) or a training pass
(`fwd+bwd`: train mode, dropout on as the release trains, backward from a fixed random
output gradient into every trainable parameter of the branch).
"""
from __future__ import annotations

from typing import Callable

import pytest
import torch

from bench import floors, harness

N_INPUT_SETS = 3


def qformer_shape(cfg, which: str) -> floors.QFormerShape:
    if which == "video":
        return floors.QFormerShape(hidden=cfg.qformer_hidden_size, heads=cfg.qformer_num_heads,
                                   intermediate=cfg.qformer_intermediate_size, layers=cfg.video_qformer_layers,
                                   encoder_width=cfg.qformer_hidden_size, queries=cfg.video_token_len,
                                   out_features=cfg.hidden_size)
    return floors.QFormerShape(hidden=cfg.qformer_hidden_size, heads=cfg.qformer_num_heads,
                               intermediate=cfg.qformer_intermediate_size, layers=cfg.audio_qformer_layers,
                               encoder_width=cfg.audio_out_dim, queries=cfg.sound_token_len,
                               out_features=cfg.hidden_size)


def branch_spec(fg, bench: str, batch: int, mode: str):
    """(input shape, output shape, call(model, x), cost) of a branch at a batch size."""
    cfg = fg.cfg
    backward = mode == "fwd+bwd"
    if bench == "video_branch":
        shape = (batch, cfg.num_frames, cfg.num_query_token, cfg.qformer_hidden_size)
        out = (batch, cfg.video_token_len, cfg.hidden_size)
        cost = floors.video_branch(batch, cfg.num_frames, cfg.num_query_token, qformer_shape(cfg, "video"),
                                   itemsize=fg.itemsize, backward=backward)
        return shape, out, (lambda m, x: m.model.video_branch(x)), cost
    if bench == "audio_branch":
        shape = (batch, cfg.num_audio_clips, cfg.audio_out_dim)
        out = (batch, cfg.sound_token_len, cfg.hidden_size)
        cost = floors.audio_branch(batch, cfg.num_audio_clips, qformer_shape(cfg, "audio"),
                                   itemsize=fg.itemsize, backward=backward)
        return shape, out, (lambda m, x: m.model.audio_branch(x)), cost
    if bench == "image_adapter":
        shape = (batch, cfg.image_token_len, cfg.clip_hidden_size)
        out = (batch, cfg.image_token_len, cfg.hidden_size)
        cost = floors.image_adapter(batch * cfg.image_token_len, cfg.clip_hidden_size, cfg.hidden_size,
                                    cfg.hidden_size, itemsize=fg.itemsize, backward=backward)
        return shape, out, (lambda m, x: m.model.mm_vision_projector(x)), cost
    raise ValueError(bench)


def run_branch(benchmark, fg, bench: str, variant: str, mode: str, batch: int, *, cpu_ok: bool,
               smallest_batch: int) -> None:
    fg.require(cpu_ok)
    if variant == "compile":
        fg.require_compile()
        fg.compile_here(batch, smallest_batch)
    if variant == "fast":
        harness.require_fast(fg)
    model = fg.model()
    in_shape, out_shape, call, cost = branch_spec(fg, bench, batch, mode)
    # Release features are outputs of frozen encoders: no gradient into them.
    inputs = [(fg.randn(*in_shape, seed=100 + i),) for i in range(N_INPUT_SETS)]
    grads = [fg.randn(*out_shape, seed=200 + i) for i in range(N_INPUT_SETS)]
    info = harness.CaseInfo(bench=bench, variant=variant, mode=mode, batch=batch,
                            shape="x".join(map(str, in_shape)), dtype=str(fg.dtype).replace("torch.", ""),
                            cost=cost, items_per_call=batch)

    def body():
        extra = {}
        if mode == "fwd":
            model.eval()
            with torch.no_grad():
                ref = call(model, inputs[0][0]) if variant != "eager" else None
        else:
            model.train()
        with harness.Variant(fg, model, variant, lambda x: call(model, x)) as f:
            if mode == "fwd":
                def fn(x):
                    with torch.no_grad():
                        return f(x)
                before = None
                if ref is not None:
                    # Eval mode is deterministic: the variant must compute the reference's function.
                    with torch.no_grad():
                        extra["rel_err_vs_eager"] = harness.rel_err(f(inputs[0][0]), ref)
            else:
                grad_of = {id(x[0]): g for x, g in zip(inputs, grads)}

                def fn(x):
                    f(x).backward(grad_of[id(x)])

                def before():
                    model.zero_grad(set_to_none=True)
            harness.run_case(benchmark, fg, info, fn, inputs, before_each=before, extra=extra)
        model.zero_grad(set_to_none=True)

    harness.oom_guard(fg, body)
    del inputs, grads
    harness.free_memory(fg.device)


VARIANTS = ("eager", "compile", "fast")
MODES = ("fwd", "fwd+bwd")


def parametrize_variants(fn: Callable) -> Callable:
    fn = pytest.mark.parametrize("mode", MODES)(fn)
    return pytest.mark.parametrize("variant", VARIANTS)(fn)
