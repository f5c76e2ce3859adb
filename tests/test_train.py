"""Training engine: ZeRO-2 equivalence, exact resume, config validation, the CLI end to end.

Everything runs the tiny preset on the demo data on CPU (gloo), a few steps each.
"""
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.train.cli import ConfigError, main, parse_config
from fastground.train.config import RELEASE_DEFAULTS, batch_sizes
from fastground.train.engine import CosineWithWarmup, load_tokenizer, param_groups, trainable_set, warmup_steps

# Every test here trains or validates through the DeepSpeed engine.
pytestmark = pytest.mark.requires("deepspeed")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""),
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def demo(tmp_path_factory):
    from fastground.data.demo import ensure_demo_data
    return str(ensure_demo_data(tmp_path_factory.mktemp("demo") / "data"))


def _data_args(demo, stage):
    # --demo-data too: a fresh tiny model takes its tokenizer from the demo set.
    # --no-fast-path: these tests are about ZeRO, resume and the CLI, on the reference
    # modules (the Triton kernels would run interpreted here, tests/conftest.py); the fast
    # engine's own equivalence tests are tests/test_train_fast.py.
    return ["--data", os.path.join(demo, f"stage{stage}.json"), "--image-folder", demo,
            "--video-folder", demo, "--sound-folder", demo, "--demo-data", demo, "--no-fast-path"]


@pytest.fixture(scope="module")
def init_model(demo, tmp_path_factory):
    """A tiny release-layout checkpoint without dropout, so a 2-rank step and a 1-process
    step see the same function."""
    tok = load_tokenizer(os.path.join(demo, "tokenizer"))
    cfg = GroundingGPTConfig.from_preset("tiny", qformer_hidden_dropout=0.0, qformer_attention_dropout=0.0)
    cfg.set_token_ids(tok)
    torch.manual_seed(0)
    model = GroundingGPT(cfg)
    path = str(tmp_path_factory.mktemp("init") / "model")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ---------------------------------------------------------------------------- 1. equivalence
def _reference_step(init, demo, stage, world, micro, accum, lr, weight_decay, max_grad_norm, seed):
    """One plain PyTorch AdamW step on the global batch the ranks of the ZeRO run saw."""
    from fastground.train.data import build_train_data, collate
    model = GroundingGPT.from_pretrained(init)
    tok = load_tokenizer(init)
    trainable = trainable_set(model, stage, lora=False)
    model.train()
    micro_batches = []
    for rank in range(world):
        td = build_train_data(os.path.join(demo, f"stage{stage}.json"), None, 0.0, tok, model.config,
                              {"image": demo, "video": demo, "sound": demo}, 1024, "pyav", 0.05, seed,
                              rank, world, micro, accum)
        it = iter(td.batches)
        for _ in range(accum):
            micro_batches.append(collate([td.samples[i] for i in next(it)], td.pad_token_id, False, 4096))
    # counted here from the labels, not with the trainer's own counting
    answers = [int((b["labels"][:, 1:] != -100).sum()) for b in micro_batches]
    for b, n in zip(micro_batches, answers):
        b.pop("_skipped"), b.pop("_samples")
        out = model(**b)
        (out.loss * n / sum(answers)).backward()
    torch.nn.utils.clip_grad_norm_(list(trainable.values()), max_grad_norm)
    factor = CosineWithWarmup(1, warmup_steps(1, 0.03))(0)
    opt = torch.optim.AdamW(param_groups(trainable, weight_decay), lr=lr * factor, foreach=False)
    opt.step()
    return model, set(trainable)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2])
def test_zero2_two_ranks_equals_single_process_adamw(demo, init_model, tmp_path, stage):
    out = tmp_path / "zero2"
    # Small reduce buckets: ZeRO-2 reduces several times during each backward, so the ranks'
    # gradient hooks must fire in the same order (different modalities per rank).
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "reduce_bucket_size": 20000,
                                                    "allgather_bucket_size": 20000}}))
    args = ["--stage", str(stage), "--model", init_model, *_data_args(demo, stage), "--output", str(out),
            "--max-steps", "1", "--global-batch", "8", "--micro-batch", "2", "--lr", "1e-3",
            "--weight-decay", "0.1", "--seed", "3", "--deepspeed-config", str(ds), "--no-progress",
            "--no-tensorboard"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "fastground.train", *args]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    assert "ZeRO-2" in res.stderr and "2 process(es)" in res.stderr
    assert "(2 per process x 2 accumulation x 2 processes)" in res.stderr

    got = GroundingGPT.from_pretrained(str(out / "final"))
    ref, trained = _reference_step(init_model, demo, stage, world=2, micro=2, accum=2, lr=1e-3,
                                   weight_decay=0.1, max_grad_norm=1.0, seed=3)
    init = GroundingGPT.from_pretrained(init_model)
    init_sd, got_sd, ref_sd = init.state_dict(), got.state_dict(), ref.state_dict()
    assert set(got_sd) == set(init_sd)
    changed, err, upd = 0, 0.0, 0.0
    for name, value in got_sd.items():
        if name in trained:
            # Elementwise, AdamW's first step is g / (|g| + eps): for a gradient near eps (or a
            # true zero, like attention key biases, that only rounding noise moves) summation
            # order alone changes that element's step, by up to its full size lr. So elements
            # get 0.5% of lr; the update as a whole gets the tight bound below.
            torch.testing.assert_close(value, ref_sd[name], rtol=1e-5, atol=5e-6, msg=lambda m: f"{name}: {m}")
            err += (value.double() - ref_sd[name].double()).pow(2).sum().item()
            upd += (ref_sd[name].double() - init_sd[name].double()).pow(2).sum().item()
            changed += not torch.equal(value, init_sd[name])
        else:  # frozen: encoders, vision tower, buffers (and the LLM in stage 1)
            assert torch.equal(value, init_sd[name]), name
    # The update as a whole agrees to 1e-5 relative; on elements whose gradient is well
    # above Adam's eps (not amplifying rounding), to fp32 summation-order noise.
    assert math.sqrt(err / upd) < 1e-5, math.sqrt(err / upd)
    e2 = u2 = 0.0
    for name, p in ref.named_parameters():
        if name in trained:
            well = p.grad.abs() > 1e-6
            e2 += (got_sd[name] - ref_sd[name]).double()[well].pow(2).sum().item()
            u2 += (ref_sd[name] - init_sd[name]).double()[well].pow(2).sum().item()
    assert math.sqrt(e2 / u2) < 2e-6, math.sqrt(e2 / u2)
    assert changed == len(trained)  # every trainable tensor moved (each branch was in the batch)


# ---------------------------------------------------------------------------- 2. resume
def _run(argv):
    from fastground.train.engine import train
    return train(parse_config(argv, world_size=1))


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(demo, tmp_path):
    # Stage 2 with replay of stage 1 and dropout on: data order, replay draws, video crops and
    # dropout masks must all continue exactly.
    common = ["--stage", "2", *_data_args(demo, 2), "--prev-data", os.path.join(demo, "stage1.json"),
              "--alpha", "0.3", "--max-steps", "6", "--global-batch", "4", "--micro-batch", "2",
              "--lr", "1e-3", "--save-every", "0", "--no-progress", "--no-tensorboard"]
    full = _run(common + ["--output", str(tmp_path / "full" / "stage2")])
    first = _run(common + ["--output", str(tmp_path / "cut" / "stage2"), "--stop-after", "3"])
    assert first.final is None and first.steps == 3 and first.checkpoint.endswith("checkpoint-0000003")
    rest = _run(common + ["--output", str(tmp_path / "cut" / "stage2"), "--resume"])
    assert [s for s, _ in rest.losses] == [4, 5, 6]
    assert first.losses + rest.losses == full.losses
    a = GroundingGPT.from_pretrained(full.final).state_dict()
    b = GroundingGPT.from_pretrained(rest.final).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from fastground.train.metrics import read_metrics
    logged = [(r["step"], r["loss"]) for r in read_metrics(str(tmp_path / "cut" / "stage2"))]
    assert logged == full.losses


# ---------------------------------------------------------------------------- 3. bad configs
BAD = [
    (["--stage", "4"], "argument --stage: invalid choice: 4"),
    (["--learning-rate", "1e-3"], "unrecognized arguments: --learning-rate"),
    (["--data", "no/such/file.json"], "--data: data file not found: no/such/file.json"),
    (["--global-batch", "6", "--micro-batch", "4"],
     "global batch 6 is not divisible by world size 2 x micro batch 4 = 8"),
    (["--global-batch", "8", "--micro-batch", "2", "--grad-accum", "3"],
     "global batch 8 != micro batch 2 x grad accum 3 x world size 2"),
    (["--stage", "1", "--lora"], "--lora applies to the LLM, which stage 1 keeps frozen"),
    (["--stage", "1", "--alpha", "0.2"], "--alpha 0.2 replays previous-stage data, but no --prev-data"),
    (["--max-steps", "0"], "--max-steps must be positive, got 0"),
    (["--resume", "no/such/dir"], "--resume: checkpoint directory not found: no/such/dir"),
]


@pytest.mark.parametrize("argv,message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_config_message(argv, message, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        rc = main(argv)
        raise SystemExit(rc)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err, err


def test_bad_config_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("stage: 2\nlearnin_rate: 0.1\n")
    with pytest.raises(ConfigError, match="unknown option 'learnin_rate'"):
        parse_config(["--config", str(f)], world_size=1)
    f.write_text("stage: 5\n")
    with pytest.raises(ConfigError, match="stage must be one of 1, 2, 3, got 5"):
        parse_config(["--config", str(f)], world_size=1)
    f.write_text("global_batch: 12\nmicro_batch: 4\nlr: 3e-4\n")
    cfg = parse_config(["--config", str(f), "--micro-batch", "3"], world_size=2)  # CLI wins
    assert (cfg.global_batch, cfg.micro_batch, cfg.grad_accum, cfg.lr) == (12, 3, 2, 3e-4)


def test_corrupt_data_file_is_a_config_error(tmp_path, capsys):
    bad = tmp_path / "corrupt.json"
    bad.write_text('[{"id": "a", "conversations": [')
    assert main(["--data", str(bad)]) == 2
    assert f"--data: {bad} is not valid JSON" in capsys.readouterr().err
    bad.write_text('{"id": "a"}')
    assert main(["--data", str(bad)]) == 2
    assert "must hold a JSON list of samples, not a dict" in capsys.readouterr().err


def test_unloadable_media_stop_the_run_with_one_line(tmp_path, capsys):
    entries = [{"id": f"s{i}", "image": f"img_{i}.png",
                "conversations": [{"from": "human", "value": "<image>\nWhere is it?"},
                                  {"from": "gpt", "value": "[0.100,0.200,0.300,0.400]"}]} for i in range(30)]
    data = tmp_path / "imgs.json"
    data.write_text(json.dumps(entries))
    rc = main(["--data", str(data), "--image-folder", str(tmp_path), "--max-steps", "2",
               "--output", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1, err
    line = [l for l in err.splitlines() if l.startswith("python -m fastground.train: error:")]
    assert line and "samples tried failed to load" in line[0] and "Traceback" not in err


def test_bad_config_exits_before_any_work(tmp_path):
    res = subprocess.run([sys.executable, "-m", "fastground.train", "--data", "missing.json"], env=_env(),
                         capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert res.returncode == 2
    assert "--data: data file not found: missing.json" in res.stderr
    assert not (tmp_path / "runs").exists()


def test_batch_defaults_follow_table_9():
    # Release settings on the paper's 8 GPUs reproduce Table 9's accumulation 1 / 2 / 2.
    for stage, want in ((1, (512, 64, 1)), (2, (256, 16, 2)), (3, (128, 8, 2))):
        assert batch_sizes(None, None, None, 8, RELEASE_DEFAULTS[stage]) == want
    # One GPU keeps the global batch with more accumulation.
    assert batch_sizes(None, None, None, 1, RELEASE_DEFAULTS[3]) == (128, 8, 16)
    f = CosineWithWarmup(100, 3)
    assert f(0) == 0.25 and f(2) == 0.75 and f(3) == 1.0 and f(99) < 1e-3
    assert math.isclose(f(3 + 97 // 2), 0.5 * (1 + math.cos(math.pi * 48 / 97)))


# ---------------------------------------------------------------------------- 4. CLI end to end
@pytest.mark.slow
def test_cli_stages_1_2_3_back_to_back(demo, tmp_path):
    runs = tmp_path / "runs"
    for stage in (1, 2, 3):
        cmd = [sys.executable, "-m", "fastground.train", "--stage", str(stage), "--demo-data", demo,
               "--output", str(runs / f"stage{stage}"), "--max-steps", "2", "--global-batch", "2",
               "--micro-batch", "1", "--no-progress"]
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
        assert res.returncode == 0, res.stderr[-4000:]
        if stage == 1:
            assert "starts from initial weights of the 'tiny' preset" in res.stderr
        else:
            assert f"starts from the previous stage's output {runs / f'stage{stage - 1}' / 'final'}" in res.stderr
        final = runs / f"stage{stage}" / "final"
        model = GroundingGPT.from_pretrained(str(final))
        assert model.config.preset == "tiny" and model.config.video_patch_token >= 0
        load_tokenizer(str(final))
        records = [json.loads(line) for line in open(runs / f"stage{stage}" / "metrics.jsonl")]
        assert [r["step"] for r in records] == [1, 2]
        assert all(math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records)
        assert (runs / f"stage{stage}" / "checkpoint-0000002" / "trainer_state.json").is_file()
        if importlib.util.find_spec("tensorboard") is not None:
            assert list((runs / f"stage{stage}" / "tensorboard").iterdir())
        else:
            assert "tensorboard is not installed" in res.stderr


# ---------------------------------------------------------------------------- Vicuna start
@pytest.mark.slow
def test_stage1_from_vicuna_and_encoder_files(demo, tmp_path):
    """The release's stage-1 start: a Llama directory, the CLIP tower, eva_vit_g.pth, the
    BLIP-2 checkpoint and imagebind_huge.pth (tiny stand-ins with the real key layouts)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = load_tokenizer(os.path.join(demo, "tokenizer"))
    cfg = GroundingGPTConfig.from_preset("tiny")
    cfg.set_token_ids(tok)
    torch.manual_seed(1)
    donor = GroundingGPT(cfg)  # the encoders' weights come from here
    vicuna = tmp_path / "vicuna"
    # Vicuna's own vocabulary ends where the media tokens start; stage 1 appends them.
    media = ["<im_patch>", "<im_start>", "<im_end>", "<vi_patch>", "<vi_start>", "<vi_end>",
             "<so_patch>", "<so_start>", "<so_end>"]
    media_ids = tok.convert_tokens_to_ids(media)
    start_end = {i for t, i in zip(media, media_ids) if t.endswith(("start>", "end>"))}
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=min(media_ids), hidden_size=cfg.hidden_size,
                                         intermediate_size=cfg.intermediate_size, num_hidden_layers=2,
                                         num_attention_heads=4, max_position_embeddings=1024))
    llama.save_pretrained(str(vicuna))
    tok.save_pretrained(str(vicuna))
    donor.model.vision_tower.save_pretrained(str(tmp_path / "clip"))
    torch.save(donor.model.visual_encoder.state_dict(), tmp_path / "eva.pth")
    inner = donor.model.state_dict()
    torch.save({"model": {k: v for k, v in inner.items() if k.startswith(("Qformer.", "query_tokens", "ln_vision."))}},
               tmp_path / "blip2.pth")
    torch.save(donor.model.audio_encoder.state_dict(), tmp_path / "imagebind.pth")

    from fastground.train.engine import train
    out = tmp_path / "run" / "stage1"
    res = train(parse_config(["--stage", "1", "--model", str(vicuna), "--preset", "tiny",
                              "--vision-tower", str(tmp_path / "clip"), "--eva", str(tmp_path / "eva.pth"),
                              "--qformer", str(tmp_path / "blip2.pth"), "--imagebind", str(tmp_path / "imagebind.pth"),
                              *_data_args(demo, 1), "--output", str(out), "--max-steps", "1", "--global-batch", "2",
                              "--micro-batch", "2", "--lr", "1e-3", "--no-progress", "--no-tensorboard"], world_size=1))
    got = GroundingGPT.from_pretrained(res.final).state_dict()
    want = llama.state_dict()
    n = want["model.embed_tokens.weight"].shape[0]
    for k, v in want.items():
        if k in ("model.embed_tokens.weight", "lm_head.weight"):
            # Media-only batches: no row of Vicuna's vocabulary learns (text embeddings are
            # detached in stage 1), the new rows start at the mean, and of those only the
            # six media start/end rows of the input embedding train (lm_head is frozen).
            changed = (got[k][:n] != v).any(1).nonzero().flatten().tolist()
            assert not changed, (k, changed[:20], len(changed))
            mean = v.mean(0)
            moved = {n + i for i, row in enumerate(got[k][n:]) if not torch.allclose(row, mean)}
            if k == "model.embed_tokens.weight":  # one step sees some of the three media kinds
                assert moved and moved <= start_end, sorted(moved)
            else:
                assert not moved, (k, sorted(moved))
        else:
            assert torch.equal(got[k], v), k
    for k, v in inner.items():
        if k.startswith(("visual_encoder.", "ln_vision.", "Qformer.", "query_tokens", "audio_encoder.",
                         "vision_tower.")):
            assert torch.equal(got["model." + k], v), k


@pytest.mark.parametrize("extra", [["--packed"], pytest.param(["--lora", "--lora-r", "4"], marks=pytest.mark.requires("peft"))],
                         ids=["packed", "lora"])
def test_packed_and_lora_runs(demo, tmp_path, extra):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "fastground.train", "--stage", "3", "--demo-data", demo, "--output", str(out),
           "--max-steps", "3", "--global-batch", "2", "--micro-batch", "2", "--no-progress", *extra]
    res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-4000:]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in records)
    model = GroundingGPT.from_pretrained(str(out / "final"))
    # the export is the plain release layout (LoRA merged), whatever trained
    assert not any("lora" in k for k in model.state_dict())
