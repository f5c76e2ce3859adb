"""`python -m fastground.evaluate` end to end on the demo set's held-out split."""
import json

import pytest
import torch

from fastground import GroundingGPT, GroundingGPTConfig
from fastground.evaluate import evaluate, read_done


@pytest.fixture(scope="module")
def demo_ckpt(tmp_path_factory):
    from transformers import AutoTokenizer

    from fastground.data.demo import ensure_demo_data

    demo = ensure_demo_data(tmp_path_factory.mktemp("demo") / "data", n_images=10, n_videos=5, n_sounds=3)
    path = tmp_path_factory.mktemp("ckpt") / "model"
    tok = AutoTokenizer.from_pretrained(str(demo / "tokenizer"))
    cfg = GroundingGPTConfig.from_preset("tiny")
    cfg.set_token_ids(tok)
    torch.manual_seed(0)
    GroundingGPT(cfg).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return demo, path


def _lines(out):
    return [json.loads(line) for p in sorted(out.glob("predictions.rank*.jsonl")) for line in p.open()]


def test_demo_heldout_is_in_the_published_formats(demo_ckpt):
    from fastground import benchmarks as B

    demo, _ = demo_ckpt
    held = demo / "heldout"
    refs = B.read_refcoco(str(held), "refcoco")
    sta = B.read_charades(str(held / "charades_sta_test.txt"), durations=str(held / "Charades_v1_test.csv"))
    pope = B.read_pope(str(held))
    assert refs and sta and pope
    assert all((held / "images" / r.media.split("/")[-1]).is_file() for r in refs)
    assert all(B.resolve_span_target(s).media.endswith(".webm") for s in sta)
    assert {p.target for p in pope} == {"yes", "no"}
    # held out: none of its images is in the training JSON
    train = (demo / "stage2.json").read_text() + (demo / "stage3.json").read_text()
    assert not any(r.media.split("/")[-1] in train for r in refs)


def test_evaluate_end_to_end_and_resume_scores_each_sample_once(demo_ckpt, tmp_path, capsys):
    demo, ckpt = demo_ckpt
    out = tmp_path / "eval"
    argv = ["--task", "demo", "--model", str(ckpt), "--data", str(demo / "heldout"), "--out", str(out),
            "--batch-size", "4", "--max-new-tokens", "4", "--workers", "0", "--cases", "2", "--no-progress",
            "--limit", "4"]

    class Stop(Exception):
        pass

    def crash_after_two(nb):
        if nb == 1:
            raise Stop

    with pytest.raises(Stop):
        evaluate(argv, on_batch=crash_after_two)
    first = _lines(out)
    assert len(first) == 8
    # a line cut by the crash is ignored, not fatal
    with open(out / "predictions.rank0.jsonl", "a") as f:
        f.write('{"key": "refcoco:val/')
    capsys.readouterr()
    summary = evaluate(argv)
    assert "resuming: 8 of" in capsys.readouterr().err
    records = [r for r in _lines(out)]
    keys = [r["key"] for r in records]
    assert len(keys) == len(set(keys))  # each sample scored once
    assert records[:8] == first  # the first run's answers were kept, not regenerated
    n_total = len(keys)
    assert sum(v["n"] + v["skipped"] for v in summary.values()) == n_total
    assert set(summary) == {"refcoco", "charades", "pope"}
    assert set(summary["pope"]["metrics"]) == {"random", "popular", "adversarial"}
    assert set(summary["charades"]["metrics"]) >= {"R@1,IoU=0.3", "R@1,IoU=0.5", "R@1,IoU=0.7", "mIoU"}
    assert json.loads((out / "results.json").read_text()) == summary
    md = (out / "results.md").read_text()
    assert "| | val |" in md and "| | Accuracy | F1-Score | Yes |" in md
    assert (out / "cases.png").stat().st_size > 0
    assert (out / "cases.html").read_text().count("<img") >= 4
    assert set(read_done(str(out))) == set(keys)
    # a third run has nothing left to do and scores nothing twice
    evaluate(argv)
    assert len(_lines(out)) == n_total


def test_evaluate_refuses_another_runs_folder_and_bad_data(demo_ckpt, tmp_path, capsys):
    demo, ckpt = demo_ckpt
    out = tmp_path / "eval"
    base = ["--model", str(ckpt), "--out", str(out), "--workers", "0", "--no-progress", "--limit", "2",
            "--max-new-tokens", "2"]
    evaluate(["--task", "pope", "--data", str(demo / "heldout")] + base)
    with pytest.raises(SystemExit, match="holds predictions of another evaluation"):
        evaluate(["--task", "refcoco", "--data", str(demo / "heldout")] + base)
    capsys.readouterr()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit):
        evaluate(["--task", "refcocog", "--data", str(empty)] + base[:2])
    assert "no refs(umd).p (the refcocog annotation file)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate(["--task", "charades", "--data", str(tmp_path / "missing.txt")] + base)
    assert "--data" in capsys.readouterr().err


def test_shards_are_disjoint_and_cover_what_is_left_for_any_world_size():
    from fastground import benchmarks as B
    from fastground.evaluate import plan_shard

    samples = [B.Sample(f"val/{i}", "refcoco", "val", "image", "x", "q", (0, 0, 1, 1)) for i in range(11)]
    done = {f"refcoco:val/{i}": {} for i in (0, 3, 4)}  # written by an earlier run of any size
    for world in (1, 2, 3):
        parts = [plan_shard(samples, done, r, world) for r in range(world)]
        todo = parts[0][0]
        ids = [s.id for _, shard in parts for s in shard]
        assert sorted(ids) == sorted(s.id for s in todo) and len(ids) == len(set(ids)) == 8


def test_a_corrupt_image_is_skipped_and_counted(demo_ckpt, tmp_path):
    import shutil

    demo, ckpt = demo_ckpt
    data = tmp_path / "heldout"
    shutil.copytree(demo / "heldout", data)
    (data / "images" / "img_h0000.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    summary = evaluate(["--task", "refcoco", "--model", str(ckpt), "--data", str(data), "--out", str(tmp_path / "e"),
                        "--workers", "0", "--no-progress", "--limit", "3", "--max-new-tokens", "2"])
    assert summary["refcoco"]["skipped"] >= 1 and summary["refcoco"]["n"] + summary["refcoco"]["skipped"] == 3
    bad = [r for r in _lines(tmp_path / "e") if r.get("error")]
    assert bad and "img_h0000.png" in bad[0]["error"]
    assert "media failed to load" in (tmp_path / "e" / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.requires("deepspeed")
def test_two_ranks_through_the_launcher_share_the_work(demo_ckpt, tmp_path):
    """torchrun with 2 CPU ranks (gloo, the training launcher's setup_distributed): each rank
    scores its own share into its own file, rank 0 merges; every sample once."""
    import os
    import subprocess
    import sys

    demo, ckpt = demo_ckpt
    out = tmp_path / "eval"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "fastground.evaluate",
           "--task", "pope", "--model", str(ckpt), "--data", str(demo / "heldout"), "--out", str(out),
           "--limit", "3", "--workers", "0", "--max-new-tokens", "2", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    per_rank = [len((out / f"predictions.rank{r}.jsonl").read_text().splitlines()) for r in (0, 1)]
    assert per_rank == [5, 4]  # 9 samples (3 per subset), rank 0 takes the odd one
    keys = [r["key"] for r in _lines(out)]
    assert len(keys) == len(set(keys)) == 9
    assert json.loads((out / "results.json").read_text())["pope"]["n"] == 9
    assert "| | Accuracy | F1-Score | Yes |" in proc.stdout
