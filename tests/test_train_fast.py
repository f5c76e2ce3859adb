"""The fast engine trains the same model as the reference path.

Fast: Triton branches (every Q-Former, the frozen frame Q-Former included), fused Llama ops,
packed steps filled to --max-tokens and the answer-only fused loss. Reference: transformers'
modules, reference Q-Formers, padded micro-batches, lm_head on every position and plain
cross-entropy. Same tiny checkpoint (no dropout), same data, 10 optimizer steps in fp32:
every step's loss within 1e-5 relative and the final trainable parameters within 1e-4
(measured: losses <= 1e-7 apart, parameters 2e-8 overall, every tensor <= 3e-6), for the
backbone side alone and with the Triton Q-Former branches on too. The attention key biases
are the exception per tensor: their gradient is zero in exact arithmetic, so both paths move
them by rounding noise only (~1e-11), held to an absolute bound instead.

The kernels run under TRITON_INTERPRET=1 on CPU (tests/conftest.py), so the batches are
small: 2 samples per step (one packed row against two padded micro-batches).

Adam's epsilon is 1e-6 here, not 1e-8: some gradients are zero in exact arithmetic (the
key biases of softmax attention) and rounding leaves ~1e-9 of noise in them, which
g / (sqrt(v) + 1e-8) would turn into lr-sized steps of random sign on either path. At 1e-6
such noise moves a parameter by ~lr x 1e-3 while every real gradient still dominates eps,
so the comparison measures the two paths' function, not Adam's amplification of rounding.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.data.tokenizer import load_tokenizer
from fastground.model.stages import trainable_parameters
from tolerances import rel_err

pytestmark = pytest.mark.requires("deepspeed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--fast-path", "--fused-llama", "--packed", "--fused-loss"]
BACKBONE_FAST = ["--no-fast-path", "--fused-llama", "--packed", "--fused-loss"]
REFERENCE = ["--no-fast-path", "--no-fused-llama", "--no-packed", "--no-fused-loss"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastground.data.demo import ensure_demo_data
    return str(ensure_demo_data(tmp_path_factory.mktemp("demo") / "data"))


@pytest.fixture(scope="module")
def init_model(demo, tmp_path_factory):
    tok = load_tokenizer(os.path.join(demo, "tokenizer"))
    cfg = GroundingGPTConfig.from_preset("tiny", qformer_hidden_dropout=0.0, qformer_attention_dropout=0.0)
    cfg.set_token_ids(tok)
    torch.manual_seed(0)
    model = GroundingGPT(cfg)
    path = str(tmp_path_factory.mktemp("init") / "model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def _args(demo, init, stage, out, steps, extra):
    return ["--stage", str(stage), "--model", init, "--data", os.path.join(demo, f"stage{stage}.json"),
            "--image-folder", demo, "--video-folder", demo, "--sound-folder", demo, "--demo-data", demo,
            "--output", str(out), "--max-steps", str(steps), "--global-batch", "2", "--micro-batch", "1",
            "--lr", "1e-3", "--seed", "5", "--save-every", "0", "--no-progress", "--no-tensorboard",
            "--max-length", "512", "--adam-eps", "1e-6", *extra]


def _train(argv):
    from fastground.train.cli import parse_config
    from fastground.train.engine import train
    return train(parse_config(argv, world_size=1))


def _compare(stage, init, fast_dir, ref_dir, fast_losses, ref_losses, loss_tol, param_tol, abs_tol=1e-6):
    """`abs_tol`: per-element bound for tensors that only rounding moves (a thousandth of one
    1e-3 learning-rate step in fp32)."""
    assert len(fast_losses) == len(ref_losses)
    for (s, a), (_, b) in zip(fast_losses, ref_losses):
        assert abs(a - b) <= loss_tol * abs(b), f"step {s}: fast loss {a} vs reference {b}"
    fast = GroundingGPT.from_pretrained(os.path.join(fast_dir, "final"))
    ref = GroundingGPT.from_pretrained(os.path.join(ref_dir, "final"))
    start = GroundingGPT.from_pretrained(init)
    trained = trainable_parameters(ref, stage)
    fsd, rsd, ssd = fast.state_dict(), ref.state_dict(), start.state_dict()
    names = sorted(trained)
    got = torch.cat([fsd[n].double().flatten() for n in names])
    want = torch.cat([rsd[n].double().flatten() for n in names])
    assert rel_err(got, want) <= param_tol
    for name in names:
        err = rel_err(fsd[name], rsd[name])
        diff = (fsd[name].double() - rsd[name].double()).abs().max().item()
        assert err <= param_tol or diff <= abs_tol, f"{name}: relative error {err:.3g}, max difference {diff:.3g}"
    assert any(not torch.equal(rsd[n], ssd[n]) for n in trained)  # the runs did train
    for name in set(rsd) - set(trained):
        assert torch.equal(fsd[name], rsd[name]), name  # frozen stays bit-identical


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_fast_engine_trains_like_the_reference_path_fp32(demo, init_model, tmp_path, stage, caplog):
    caplog.set_level("INFO", logger="fastground.train")
    ref = _train(_args(demo, init_model, stage, tmp_path / "ref", 10, REFERENCE))
    backbone = _train(_args(demo, init_model, stage, tmp_path / "backbone", 10, BACKBONE_FAST))
    _compare(stage, init_model, backbone.output, ref.output, backbone.losses, ref.losses, 1e-5, 1e-4)
    fast = _train(_args(demo, init_model, stage, tmp_path / "fast", 10, FAST))
    log = caplog.text
    assert "Qformer (frozen, under no_grad), video_Qformer" in log
    assert "fused RMSNorm, RoPE and SwiGLU in 2 Llama layers" in log
    assert "batches: packed" in log and "answer-only chunked linear cross-entropy" in log
    _compare(stage, init_model, fast.output, ref.output, fast.losses, ref.losses, 1e-5, 1e-4)
    rec = [json.loads(line) for line in open(os.path.join(fast.output, "metrics.jsonl"))]
    assert all(r["padding_waste"] == 1.0 for r in rec if "padding_waste" in r)
    padded = [json.loads(line) for line in open(os.path.join(ref.output, "metrics.jsonl"))]
    assert all(r["padding_waste"] >= 1.0 and r["micro_batches"] == 2 for r in padded)  # 1 sample each: no padding
    assert all(r["micro_batches"] == 1 for r in rec)  # both samples in one packed row


@pytest.mark.slow
def test_fast_engine_bf16_within_tolerance(demo, init_model, tmp_path):
    ref = _train(_args(demo, init_model, 3, tmp_path / "ref", 3, REFERENCE + ["--precision", "bf16"]))
    fast = _train(_args(demo, init_model, 3, tmp_path / "fast", 3, FAST + ["--precision", "bf16"]))
    _compare(3, init_model, fast.output, ref.output, fast.losses, ref.losses, 1e-2, 2e-2, abs_tol=1e-4)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(argv, cwd):
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "fastground.train", *argv]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=str(cwd))
    assert res.returncode == 0, res.stderr[-4000:]
    return res.stderr


def _losses(out):
    return [(r["step"], r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl")))]


@pytest.mark.slow
def test_fast_engine_zero2_two_ranks(demo, init_model, tmp_path):
    """ZeRO-2 on 2 gloo ranks, 4 samples a step: the packed ranks may hold different numbers
    of micro-batches (--max-tokens one sample's worth), the short one runs empty ones."""
    common = ["--global-batch", "4", "--micro-batch", "2"]
    ref_out, fast_out = tmp_path / "ref", tmp_path / "fast"
    _torchrun(_args(demo, init_model, 3, ref_out, 3, REFERENCE) + common, tmp_path)
    err = _torchrun(_args(demo, init_model, 3, fast_out, 3, FAST + ["--max-tokens", "512"]) + common, tmp_path)
    assert "2 process(es)" in err
    _compare(3, init_model, str(fast_out), str(ref_out), _losses(fast_out), _losses(ref_out), 1e-5, 1e-4)
