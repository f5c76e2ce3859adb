"""Frozen-encoder feature cache: `python -m fastground.features` then
`python -m fastground.train --feature-cache`.

Training from the cache must be the same function as training from media (bit for bit in
fp32 with the same crops), a cache made for other weights or preprocessing is refused naming
what differs, and an interrupted build resumes writing every entry once.
"""
import json
import os
import sqlite3

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.data.feature_cache import CacheError, FeatureCache
from fastground.train.cli import parse_config
from media_clips import h264_clip
from tests.tolerances import REL_TOL, rel_err

pytestmark = pytest.mark.requires("deepspeed", "safetensors")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fastground.data.demo import ensure_demo_data
    return str(ensure_demo_data(tmp_path_factory.mktemp("fc") / "data", n_images=6, n_videos=6, n_sounds=6))


def _data_args(demo, stage):
    return ["--data", os.path.join(demo, f"stage{stage}.json"), "--image-folder", demo, "--video-folder", demo,
            "--sound-folder", demo, "--tokenizer", os.path.join(demo, "tokenizer")]


def _features(argv, tmp):
    from fastground.features import main
    # --output: where the trainer would look for a previous stage's weights (none there)
    assert main(argv + ["--no-progress", "--no-fast-path", "--output", str(tmp / "features-run")]) == 0


def _train(argv):
    from fastground.train.engine import train
    # the reference modules: Triton's CPU interpreter would take minutes (tests/test_train_fast*)
    return train(parse_config(argv + ["--no-progress", "--no-tensorboard", "--save-every", "0", "--no-fast-path"],
                              world_size=1))


def _weights(path):
    return GroundingGPT.from_pretrained(path).state_dict()


# 10 steps of 2 samples: stage 1 (18 samples) runs two epochs, so the cache holds two views.
# One sample per forward, and the cache encoded one media per call: CPU kernels block a
# batch of 1 and a batch of 8 differently, which moves the last bit of a few features.
STEPS = ["--max-steps", "10", "--global-batch", "2", "--micro-batch", "1", "--no-packed", "--lr", "1e-3"]
ONE = ["--batch", "1"]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_training_from_cache_equals_training_from_media_fp32(demo, tmp_path, stage):
    cache = str(tmp_path / "cache")
    _features(_data_args(demo, stage) + ["--stage", str(stage), "--out", cache, "--views", "2",
                                         "--precision", "fp32"] + ONE, tmp_path)
    common = _data_args(demo, stage) + ["--stage", str(stage), "--precision", "fp32"] + STEPS
    media = _train(common + ["--output", str(tmp_path / "media")])
    cached = _train(common + ["--output", str(tmp_path / "cached"), "--feature-cache", cache, "--cache-strict"])
    assert cached.losses == media.losses
    a, b = _weights(media.final), _weights(cached.final)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    # the encoders were detached (fastground.model.detached) and copied back byte for byte
    assert os.path.isfile(os.path.join(cached.output, "frozen-encoders", "encoders.safetensors"))
    assert not os.path.exists(os.path.join(media.output, "frozen-encoders"))
    for name in ["model.safetensors"] + [os.path.join("vision_tower", f) for f in
                                         os.listdir(os.path.join(media.final, "vision_tower"))]:
        with open(os.path.join(media.final, name), "rb") as f, open(os.path.join(cached.final, name), "rb") as g:
            assert f.read() == g.read(), name


@pytest.mark.slow
def test_training_from_cache_bf16_within_tolerance(demo, tmp_path):
    cache = str(tmp_path / "cache")
    _features(_data_args(demo, 1) + ["--stage", "1", "--out", cache, "--views", "2", "--precision", "bf16"] + ONE, tmp_path)
    common = _data_args(demo, 1) + ["--stage", "1", "--precision", "bf16"] + STEPS
    media = _train(common + ["--output", str(tmp_path / "media")])
    cached = _train(common + ["--output", str(tmp_path / "cached"), "--feature-cache", cache, "--cache-strict"])
    losses_m = torch.tensor([l for _, l in media.losses])
    losses_c = torch.tensor([l for _, l in cached.losses])
    assert rel_err(losses_c, losses_m) <= REL_TOL[torch.bfloat16]
    a, b = _weights(media.final), _weights(cached.final)
    from fastground.data.tokenizer import load_tokenizer
    from fastground.model.stages import is_trainable
    from fastground.train.engine import build_model
    init_cfg = parse_config(common + ["--output", str(tmp_path / "init")], world_size=1)
    init = build_model(init_cfg, load_tokenizer(os.path.join(demo, "tokenizer")), True)[0].state_dict()
    trained = [k for k in a if is_trainable(k, 1)]
    # the update of every trained tensor over the 10 steps
    upd_m = torch.cat([(a[k].float() - init[k].float()).flatten() for k in trained])
    upd_c = torch.cat([(b[k].float() - init[k].float()).flatten() for k in trained])
    assert upd_m.abs().max() > 0
    assert rel_err(upd_c, upd_m) <= REL_TOL[torch.bfloat16]


# ---------------------------------------------------------------------------- refusals


@pytest.fixture(scope="module")
def checkpoints(demo, tmp_path_factory):
    """Two tiny release-layout checkpoints that differ only in the EVA weights, and the first
    with 2 frames per video instead of 4 (same weights, other preprocessing)."""
    from fastground.data.tokenizer import load_tokenizer
    tok = load_tokenizer(os.path.join(demo, "tokenizer"))
    cfg = GroundingGPTConfig.from_preset("tiny")
    cfg.set_token_ids(tok)
    torch.manual_seed(0)
    model = GroundingGPT(cfg)
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    w = model.model.visual_encoder.patch_embed.proj.weight
    original = w.detach().clone()
    for name in ("a", "b", "a_frames"):
        with torch.no_grad():
            w.copy_(original + 1e-3 if name == "b" else original)
        if name == "a_frames":
            model.config.num_frames = 2
        path = str(root / name)
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[name] = path
    return out


@pytest.fixture(scope="module")
def cache_a(demo, checkpoints, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cache")
    cache = str(tmp / "a")
    _features(_data_args(demo, 1) + ["--stage", "1", "--model", checkpoints["a"], "--out", cache,
                                     "--precision", "fp32"], tmp)
    return cache


def _refused(argv, tmp_path, *needles):
    with pytest.raises(CacheError) as e:
        _train(argv + ["--max-steps", "1", "--output", str(tmp_path / "run")])
    for n in needles:
        assert n in str(e.value), str(e.value)
    return str(e.value)


@pytest.mark.slow
def test_cache_refused_for_other_weights_or_preprocessing(demo, checkpoints, cache_a, tmp_path):
    base = _data_args(demo, 1) + ["--stage", "1", "--precision", "fp32", "--feature-cache", cache_a]
    msg = _refused(base + ["--model", checkpoints["b"]], tmp_path, "encoder weights")
    assert "preprocessing" not in msg
    msg = _refused(base + ["--model", checkpoints["a_frames"]], tmp_path,
                   "video preprocessing frames (cache 4, this run 2)")
    assert "encoder weights" not in msg
    _refused(base + ["--model", checkpoints["a"], "--seed", "5"], tmp_path, "seed of the video crops (cache 42, this run 5)")
    _refused(base + ["--model", checkpoints["a"], "--precision", "bf16"], tmp_path, "dtype (cache float32, this run bfloat16)")


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return str(dst)


@pytest.mark.slow
def test_truncated_shard_and_missing_entry(demo, checkpoints, cache_a, tmp_path):
    base = _data_args(demo, 1) + ["--stage", "1", "--precision", "fp32", "--model", checkpoints["a"]]
    # a truncated shard is named, on open and by the trainer
    cut = _copy(cache_a, tmp_path / "cut")
    shard = os.path.join(cut, "shards", sorted(os.listdir(os.path.join(cut, "shards")))[0])
    with open(shard, "r+b") as f:
        f.truncate(os.path.getsize(shard) - 100)
    _refused(base + ["--feature-cache", cut], tmp_path, os.path.basename(shard), "truncated")
    # a missing entry: refused with --cache-strict, encoded (and counted) without it
    holed = _copy(cache_a, tmp_path / "holed")
    with sqlite3.connect(os.path.join(holed, "index.sqlite")) as db:
        (modality, path), = db.execute("SELECT modality, path FROM entries WHERE modality = 'video' LIMIT 1").fetchall()
        db.execute("DELETE FROM entries WHERE modality = ? AND path = ?", (modality, path))
    _refused(base + ["--feature-cache", holed, "--cache-strict"], tmp_path / "s", "1 of the", path)
    n_before = len(FeatureCache.open(holed))
    run = _train(base + ["--feature-cache", holed, "--max-steps", "1", "--output", str(tmp_path / "fill")])
    assert run.steps == 1
    assert len(FeatureCache.open(holed)) == n_before + 1
    # an entry made from other file contents is not served
    from fastground.features import fingerprint
    c = FeatureCache.open(cache_a)
    modality, key, view = c.entries()[0]
    path = os.path.join(demo, key)
    assert c.get(modality, key, view, fingerprint(path)) is not None
    changed = tmp_path / "changed" / os.path.basename(key)
    changed.parent.mkdir()
    changed.write_bytes(open(path, "rb").read() + b"\0")
    assert c.get(modality, key, view, fingerprint(str(changed))) is None


# ---------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_interrupted_build_resumes_writing_every_entry_once(demo, tmp_path, monkeypatch):
    from fastground import features
    from fastground.train.engine import setup_distributed
    cfg, own = features.parse(_data_args(demo, 1) + ["--stage", "1", "--out", str(tmp_path / "c"), "--views", "2",
                                                     "--precision", "fp32", "--no-fast-path"])
    info = setup_distributed()
    model, data, prev, folders = features.load_encoders(cfg, info)
    items = features.plan(data, prev, cfg.alpha, folders, model.config, cfg.seed, 2)
    assert len({(i.modality, i.key, i.view) for i in items}) == len(items)
    spec = features.cache_spec(cfg, model, 2)
    cache = FeatureCache.create_or_open(own["out"], spec)

    written = []
    real = FeatureCache.write_shard

    def spy(self, rank, batch):
        name = real(self, rank, batch)
        written.extend((m, p, v) for m, p, v, _, _ in batch)
        if len(written) >= 10 and not getattr(spy, "fired", False):
            spy.fired = True
            raise KeyboardInterrupt  # killed right after a shard was committed
        return name

    monkeypatch.setattr(FeatureCache, "write_shard", spy)
    with pytest.raises(KeyboardInterrupt):
        features.build(model, items, cache, shard_size=4, batch=3, progress=False)
    assert 10 <= len(written) < len(items)
    # a shard file renamed into place whose rows never made it: removed, its entries redone
    orphan = os.path.join(own["out"], "shards", "r0-999999.safetensors")
    open(orphan, "wb").write(b"x" * 10)
    counts = features.build(model, items, FeatureCache.create_or_open(own["out"], spec), shard_size=4, batch=3,
                            progress=False)
    assert not os.path.exists(orphan)
    assert sorted(written) == sorted((i.modality, i.key, i.view) for i in items)  # each entry once
    assert counts["skipped"] == 12 and counts["written"] == len(items) - 12
    again = features.build(model, items, FeatureCache.open(own["out"], spec), progress=False)
    assert again["written"] == 0 and again["skipped"] == len(items)
    # the stored features are those of a build in one go
    whole = str(tmp_path / "whole")
    monkeypatch.setattr(FeatureCache, "write_shard", real)
    features.build(model, items, FeatureCache.create_or_open(whole, spec), progress=False)
    a, b = FeatureCache.open(own["out"], spec), FeatureCache.open(whole, spec)
    for it in items:
        assert torch.equal(a.get(it.modality, it.key, it.view), b.get(it.modality, it.key, it.view))


# ---------------------------------------------------------------------------- uint8 frames


@pytest.mark.parametrize("resize_mode", ["squash", "center_crop"])
@pytest.mark.parametrize("train", [False, True])
def test_uint8_frames_normalised_on_the_device_equal_the_float_path(demo, resize_mode, train):
    from fastground.data.video import load_video, normalize_frames
    cfg = GroundingGPTConfig.from_preset("tiny")
    videos = sorted(os.listdir(os.path.join(demo, "videos")))[:2]
    floats, frames = [], []
    for i, name in enumerate(videos):
        path = os.path.join(demo, "videos", name)
        kw = dict(train=train, seed=1234 + i, resize_mode=resize_mode)
        floats.append(load_video(path, cfg, **kw))
        u = load_video(path, cfg, normalize=False, **kw)
        assert u.dtype == torch.uint8 and u.shape == (cfg.num_frames, cfg.eva_image_size, cfg.eva_image_size, 3)
        frames.append(u)
    floats, frames = torch.stack(floats), torch.stack(frames)
    assert floats.dtype == torch.float32
    assert torch.equal(normalize_frames(frames), floats)  # the batch, as the model normalises it
    torch.manual_seed(0)
    model = GroundingGPT(cfg).eval()
    with torch.no_grad():
        assert torch.equal(model.model.frame_features(frames), model.model.frame_features(floats))


def test_trainer_ships_uint8_frames(demo):
    from fastground.train.data import SeededVideoLoader
    cfg = GroundingGPTConfig.from_preset("tiny")
    loader = SeededVideoLoader()
    loader.seed = loader.item_seed(42, 0, 3)
    path = os.path.join(demo, "videos", sorted(os.listdir(os.path.join(demo, "videos")))[0])
    x = loader(path, cfg, train=True)
    assert x.dtype == torch.uint8 and x.shape[-1] == 3


# ---------------------------------------------------------------------------- DALI and workers


def test_dali_gpu_decoding_is_refused_in_a_forked_worker(monkeypatch):
    from fastground.data.video import DALIDecoder, worker_start_method
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert worker_start_method("dali") == "spawn"
    assert worker_start_method("pyav") is None
    monkeypatch.setattr(torch.cuda, "_is_in_bad_fork", lambda: True)
    with pytest.raises(RuntimeError, match="forked DataLoader worker"):
        DALIDecoder(device="gpu")._pipe(56)


@pytest.mark.slow
@pytest.mark.requires("nvidia.dali")
def test_trainer_loader_spawns_workers_for_dali(demo, monkeypatch):
    """With DALI on a GPU the trainer's workers are spawned, not forked. On CPU the spawned
    worker decodes with DALI's CPU decoder: the whole path (dataset pickled into a fresh
    process, decoding there, uint8 frames back) runs and gives the main process's batch."""
    from fastground.data.tokenizer import load_tokenizer
    from fastground.train.data import build_train_data
    tok = load_tokenizer(os.path.join(demo, "tokenizer"))
    cfg = GroundingGPTConfig.from_preset("tiny")
    cfg.set_token_ids(tok)
    videos = [e for e in json.load(open(os.path.join(demo, "stage1.json"))) if "video" in e][:2]
    data = os.path.join(os.path.dirname(demo), "videos_only.json")
    json.dump(videos, open(data, "w"))
    td = build_train_data(data, None, 0.0, tok, cfg, {"video": demo}, 256, "dali", 0.05, 42, 0, 1, 2, 1)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        loader = td.loader(0, 1, False, 256, 42, False)
    assert loader.multiprocessing_context.get_start_method() == "spawn"
    spawned = next(iter(loader))
    inline = next(iter(td.loader(0, 0, False, 256, 42, False)))
    assert spawned["videos"].dtype == torch.uint8 and torch.equal(spawned["videos"], inline["videos"])


# ---------------------------------------------------------------------------- probing


def test_mp4_probed_from_its_header_and_a_cut_file_still_fails(tmp_path, monkeypatch):
    import av
    from fastground.data.errors import MediaError
    from fastground.data.video import load_video, probe_video
    path = h264_clip(tmp_path / "clip.mp4")
    demuxed = []
    real = av.container.InputContainer.demux
    monkeypatch.setattr(av.container.InputContainer, "demux", lambda self, *a, **k: demuxed.append(1) or real(self, *a, **k))
    info = probe_video(path)
    assert (info.n_frames, info.width, info.height, info.codec) == (90, 96, 64, "h264") and not demuxed
    monkeypatch.undo()
    cfg = GroundingGPTConfig.from_preset("tiny")
    assert load_video(path, cfg).shape == (3, cfg.num_frames, cfg.eva_image_size, cfg.eva_image_size)
    cut = tmp_path / "cut.mp4"
    data = open(path, "rb").read()
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(MediaError, match="truncated|corrupt"):
        load_video(str(cut), cfg)


# ---------------------------------------------------------------------------- two ranks


@pytest.mark.slow
def test_two_ranks_share_the_build_and_write_every_entry_once(demo, tmp_path):
    """python -m fastground.features under the trainer's launcher: each rank encodes every
    second media into its own shards; together they write each entry exactly once, the
    features a single process writes."""
    import socket
    import subprocess
    import sys
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=repo + os.pathsep + os.environ.get("PYTHONPATH", ""), DS_ACCELERATOR="cpu",
               OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = str(tmp_path / "two")
    args = _data_args(demo, 1) + ["--stage", "1", "--out", two, "--precision", "fp32", "--no-fast-path",
                                  "--no-progress", "--output", str(tmp_path / "run")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "fastground.features", *args]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert res.returncode == 0, res.stderr[-3000:]
    shards = sorted(os.listdir(os.path.join(two, "shards")))
    assert any(n.startswith("r0-") for n in shards) and any(n.startswith("r1-") for n in shards)
    one = str(tmp_path / "one")
    _features(args[:args.index("--out")] + ["--stage", "1", "--out", one, "--precision", "fp32"], tmp_path)
    a, b = FeatureCache.open(two), FeatureCache.open(one)
    assert a.entries() == b.entries() and len(a) == len(set(a.entries()))
    for m, p, v in b.entries():
        # the ranks batch other media together: equal up to the kernels' batch-size rounding
        assert rel_err(a.get(m, p, v), b.get(m, p, v)) <= REL_TOL[torch.float32]
