"""Score a checkpoint on the paper's grounding benchmarks.

    python -m fastground.evaluate --task refcoco --model CKPT --data refcoco/ --media-root coco/train2014
    python -m fastground.evaluate --task charades --model CKPT --data charades_sta_test.txt \\
        --media-root Charades_v1_480 --durations Charades_v1_test.csv
    python -m fastground.evaluate --task pope --model CKPT --data pope/ --media-root coco/val2014
    torchrun --nproc_per_node 8 -m fastground.evaluate --task refcoco ...   # sharded over GPUs
    python -m fastground.evaluate --task demo --model CKPT --data DEMO/heldout

Tasks: refcoco, refcoco+, refcocog (Acc@0.5 per split), charades (R@1 at IoU 0.3/0.5/0.7,
mIoU), pope (accuracy, F1, yes-ratio per subset), demo (all three readers on the demo set's
held-out split). File formats: fastground.benchmarks.

Writes into --out: `predictions.rank{R}.jsonl` (one line per scored sample, appended as it
goes: an interrupted run started again with the same --out scores only what is missing),
`results.json`, `results.md` (the paper's table layout) and `cases.html` + `cases.png`
(the best and worst cases drawn).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from fastground import benchmarks as B

log = logging.getLogger("fastground")

DEFAULT_MAX_NEW_TOKENS = {"rec": 40, "charades": 24, "pope": 8}


def _kind(task: str) -> str:
    return "rec" if task in B.REC_TASKS else task


# ----------------------------------------------------------------------------- samples
def load_samples(task: str, data: str, media_root: str | None = None, durations: str | None = None,
                 splits: Sequence[str] | None = None) -> list[B.Sample]:
    if task in B.REC_TASKS:
        return B.read_refcoco(data, task, splits, media_root)
    if task == "charades":
        path = data
        if os.path.isdir(data):
            path = os.path.join(data, "charades_sta_test.txt")
            if durations is None and os.path.isfile(os.path.join(data, "Charades_v1_test.csv")):
                durations = os.path.join(data, "Charades_v1_test.csv")
        return B.read_charades(path, media_root, durations)
    if task == "pope":
        return B.read_pope(data, tuple(splits or B.POPE_SUBSETS), media_root)
    if task == "demo":
        return (load_samples("refcoco", data) + load_samples("charades", data)
                + load_samples("pope", data))
    raise ValueError(f"unknown task {task!r}; choose one of {B.TASKS + ('demo',)}")


def _key(s: B.Sample) -> str:
    return f"{s.task}:{s.id}"


class _MediaSet(torch.utils.data.Dataset):
    """Loads a sample's media (in DataLoader workers); a file that fails to load comes back
    as an error string so the run counts it and goes on."""

    def __init__(self, samples: list[B.Sample], cfg):
        self.samples, self.cfg = samples, cfg

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        from fastground.data.errors import MediaError
        from fastground.infer import load_media

        s = self.samples[i]
        try:
            if s.task == "charades":
                B.resolve_span_target(s)
            media = load_media(s.modality, s.media, self.cfg)
            return i, s.target, s.meta.get("duration"), media, None
        except (MediaError, OSError, ValueError) as e:
            return i, s.target, s.meta.get("duration"), None, f"{type(e).__name__}: {e}"


def _collate(items):
    return items


# ------------------------------------------------------------------------------ resume
def read_done(out_dir: str) -> dict[str, dict]:
    """Records already written by any rank; a line cut by a crash is ignored."""
    done: dict[str, dict] = {}
    if not os.path.isdir(out_dir):
        return done
    for name in sorted(os.listdir(out_dir)):
        if not (name.startswith("predictions.rank") and name.endswith(".jsonl")):
            continue
        with open(os.path.join(out_dir, name), encoding="utf-8") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done.setdefault(r["key"], r)
    return done


def _check_run(out_dir: str, identity: dict) -> None:
    """A resumed run must be the same evaluation (task, data, model, prompt settings)."""
    path = os.path.join(out_dir, "run.json")
    if os.path.isfile(path):
        with open(path) as f:
            have = json.load(f)
        diff = {k: (have.get(k), v) for k, v in identity.items() if have.get(k) != v}
        if diff:
            raise SystemExit(f"error: {out_dir} holds predictions of another evaluation ({diff}); "
                             "choose another --out or remove it")
    else:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(identity, f, indent=2, sort_keys=True)
        os.replace(tmp, path)


def plan_shard(samples: list[B.Sample], done, rank: int, world: int) -> tuple[list[B.Sample], list[B.Sample]]:
    """(samples not scored yet, this rank's share of them). Every rank computes the same
    list from the same files, so the shares are disjoint and cover it whatever the world
    size of the run that wrote the files."""
    todo = [s for s in samples if _key(s) not in done]
    return todo, todo[rank::world]


# ------------------------------------------------------------------------------ running
@dataclass
class EvalSettings:
    batch_size: int = 16
    max_new_tokens: Optional[int] = None  # None: per-task default
    workers: int = 2
    progress: bool = True


def run_shard(model, tokenizer, samples: list[B.Sample], out_path: str, settings: EvalSettings,
              on_batch: Callable[[int], None] | None = None, rank: int = 0) -> int:
    """Generate and score `samples`, appending one JSON line per sample to out_path.
    Returns the number of samples written."""
    from tqdm import tqdm

    from fastground.infer import generation_settings
    from fastground.prompting import prompt_ids, prompt_style

    if not samples:
        return 0
    style = prompt_style(model.config)
    loader = torch.utils.data.DataLoader(_MediaSet(samples, model.config), batch_size=settings.batch_size,
                                         shuffle=False, num_workers=settings.workers, collate_fn=_collate,
                                         persistent_workers=False)
    bar = tqdm(total=len(samples), unit="sample", disable=not settings.progress or rank != 0,
               desc="evaluate", dynamic_ncols=True, file=sys.stderr)
    written = 0
    t0 = time.perf_counter()
    _drop_partial_line(out_path)
    with open(out_path, "a", encoding="utf-8") as out:
        for nb, items in enumerate(loader):
            rows, media, keep, records = [], {"images": [], "videos": [], "sounds": []}, [], []
            for i, target, duration, m, err in items:
                s = samples[i]
                s.target, s.meta["duration"] = target, duration
                if err is not None:
                    records.append(_record(s, None, error=err))
                    continue
                for k, v in m.items():
                    media[k].append(v)
                rows.append(prompt_ids(style, [(s.question, None)], tokenizer, model.config, s.modality))
                keep.append(s)
            if rows:
                kinds = {_kind(s.task) for s in keep}
                budget = settings.max_new_tokens or max(DEFAULT_MAX_NEW_TOKENS[k] for k in kinds)
                gen = generation_settings(model, tokenizer, max_new_tokens=budget)
                stacked = {k: torch.cat(v) for k, v in media.items() if v}
                res = model.generate(rows, config=gen, tokenizer=tokenizer, **stacked)
                records += [_record(s, t) for s, t in zip(keep, res.texts)]
            for r in records:
                out.write(json.dumps(r) + "\n")
            out.flush()
            os.fsync(out.fileno())
            written += len(records)
            bar.update(len(records))
            if torch.cuda.is_available():
                bar.set_postfix(mem=f"{torch.cuda.max_memory_allocated() / 2**30:.1f}GiB", refresh=False)
            if on_batch is not None:
                on_batch(nb)
    bar.close()
    if rank == 0 and settings.progress:
        dt = time.perf_counter() - t0
        print(f"rank 0: {written} samples in {dt:.1f} s ({written / max(dt, 1e-9):.2f} samples/s)", file=sys.stderr)
    return written


def _drop_partial_line(path: str) -> None:
    """Cut a line a crash left unfinished, so the next record starts on a line of its own."""
    if not os.path.isfile(path):
        return
    with open(path, "rb+") as f:
        data = f.read()
        if data and not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def _record(s: B.Sample, text: Optional[str], error: Optional[str] = None) -> dict:
    r = {"key": _key(s), "task": s.task, "split": s.split, "id": s.id, "media": s.media,
         "question": s.question, "target": list(s.target) if isinstance(s.target, (tuple, list)) else s.target,
         "meta": s.meta}
    if error is not None:
        r.update(answer=None, error=error)
    else:
        r.update(answer=text, **B.score(s, text))
    return r


def summarize(records: list[dict]) -> dict:
    """Metrics per task from the merged records; samples whose media failed are counted."""
    out = {}
    for task in sorted({r["task"] for r in records}):
        rs = [r for r in records if r["task"] == task]
        ok = [r for r in rs if r.get("error") is None]
        out[task] = {"metrics": B.metrics(task, ok) if ok else {}, "n": len(ok), "skipped": len(rs) - len(ok)}
    return out


def write_reports(out_dir: str, records: list[dict], summary: dict, model_name: str, n_cases: int = 6) -> None:
    with open(os.path.join(out_dir, "results.json.tmp"), "w") as f:
        json.dump(summary, f, indent=2, sort_keys=True)
    os.replace(os.path.join(out_dir, "results.json.tmp"), os.path.join(out_dir, "results.json"))
    md = []
    for task, res in summary.items():
        md.append(f"### {task} ({res['n']} samples" + (f", {res['skipped']} skipped: media failed to load)"
                                                       if res["skipped"] else ")"))
        md.append("")
        if res["metrics"]:
            md.append(B.markdown_table(task, res["metrics"], model_name))
    with open(os.path.join(out_dir, "results.md"), "w") as f:
        f.write("\n".join(md))
    try:
        write_cases(out_dir, records, n_cases)
    except Exception as e:  # pictures must never cost the numbers
        log.warning("cases page not written: %s: %s", type(e).__name__, e)


def _case_score(r: dict) -> float:
    return r["iou"] if "iou" in r else r.get("correct", 0.0)


def _case_picture(r: dict):
    from fastground.infer import picture

    head = f"{r['id']}  " + (f"IoU {r['iou']:.2f}" if "iou" in r else
                             f"label {r['target']}, read as {r['pred']}")
    cap = f"Q: {r['question']}\nA: {r['answer']}"
    if r["task"] == "pope":
        from PIL import Image

        from fastground.visualize import box_picture
        return head, box_picture(Image.open(r["media"]), None, None, cap)
    modality = "video" if r["task"] == "charades" else "image"
    img, _ = picture(modality, r["media"], r["answer"], true=r["target"], caption=cap)
    return head, img


def write_cases(out_dir: str, records: list[dict], n: int = 6) -> None:
    """cases.html (self-contained) and cases.png: per task the n best and n worst samples."""
    from fastground.visualize import contact_sheet, html_page

    sections, tiles = [], []
    for task in sorted({r["task"] for r in records}):
        rs = sorted((r for r in records if r["task"] == task and r.get("error") is None), key=_case_score)
        if not rs:
            continue
        worst = rs[:n]
        best = [r for r in reversed(rs[-n:]) if r not in worst] if len(rs) > n else []
        for label, group in (("best", best), ("worst", worst)):
            pics = [_case_picture(r) for r in group]
            if pics:
                sections.append((f"{task}: {label} {len(pics)}", pics))
                tiles += [(f"{task} {label}: {h}", im) for h, im in pics]
    if not tiles:
        return
    with open(os.path.join(out_dir, "cases.html"), "w", encoding="utf-8") as f:
        f.write(html_page("Best and worst cases", sections,
                          "<p>Green: true; magenta: predicted (boxes relative to the padded square image; "
                          "spans relative to the clip).</p>"))
    contact_sheet(tiles, "Best and worst cases (green true, magenta predicted)").save(
        os.path.join(out_dir, "cases.png"))


# ---------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    from fastground.infer import add_model_args

    ap = argparse.ArgumentParser(prog="python -m fastground.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=[*B.TASKS, "demo"])
    add_model_args(ap)
    ap.add_argument("--data", required=True,
                    help="annotation directory (RefCOCO*: refs(*).p + instances.json; POPE: coco_pope_*.json) "
                         "or file (Charades-STA: charades_sta_test.txt)")
    ap.add_argument("--media-root", help="images/videos folder (default: DATA/images or DATA/videos)")
    ap.add_argument("--durations", help="Charades_v1_test.csv with video lengths (default: read from the videos)")
    ap.add_argument("--splits", nargs="+", help="RefCOCO splits or POPE subsets (default: the paper's)")
    ap.add_argument("--out", help="output directory (default: eval/<task>-<model name>)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, help="default: 40 for boxes, 24 for spans, 8 for POPE")
    ap.add_argument("--workers", type=int, default=2, help="media loading processes per rank")
    ap.add_argument("--limit", type=int, help="only the first N samples of each split (a quick look)")
    ap.add_argument("--cases", type=int, default=6, help="best and worst cases drawn per task")
    ap.add_argument("--no-progress", action="store_true")
    return ap


def _validate(ap: argparse.ArgumentParser, args) -> None:
    from fastground.infer import check_model_args

    check_model_args(ap, args)
    if not os.path.exists(args.data):
        ap.error(f"--data {args.data}: not found")
    if args.media_root and not os.path.isdir(args.media_root):
        ap.error(f"--media-root {args.media_root}: not a directory")
    if args.durations and not os.path.isfile(args.durations):
        ap.error(f"--durations {args.durations}: file not found")
    if args.batch_size < 1:
        ap.error(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        ap.error(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.limit is not None and args.limit < 1:
        ap.error(f"--limit must be >= 1, got {args.limit}")


def _distributed():
    """The training launcher's process group when run under torchrun, else one process."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        from fastground.train.engine import setup_distributed
        info = setup_distributed()
        return info.rank, info.world_size, info.device
    return 0, 1, None


def evaluate(argv=None, on_batch: Callable[[int], None] | None = None) -> dict:
    ap = build_parser()
    args = ap.parse_args(argv)
    _validate(ap, args)
    from fastground.infer import load_for_inference, resolve_device

    try:
        samples = load_samples(args.task, args.data, args.media_root, args.durations, args.splits)
    except (FileNotFoundError, B.BenchmarkFormatError) as e:
        ap.error(str(e))
    if args.limit:
        seen: dict = {}
        samples = [s for s in samples if seen.setdefault((s.task, s.split), []).append(s) or
                   len(seen[(s.task, s.split)]) <= args.limit]
    keys = [_key(s) for s in samples]
    if len(set(keys)) != len(keys):
        ap.error(f"--data {args.data}: sample ids are not unique")
    model_name = os.path.basename(os.path.normpath(args.model))
    out_dir = args.out or os.path.join("eval", f"{args.task}-{model_name}")
    os.makedirs(out_dir, exist_ok=True)

    rank, world, device = _distributed()
    if device is None or args.device != "auto":
        device = resolve_device(args.device)
    identity = {"task": args.task, "data": os.path.abspath(args.data), "model": os.path.abspath(args.model),
                "max_new_tokens": args.max_new_tokens, "splits": args.splits, "limit": args.limit}
    if rank == 0:
        _check_run(out_dir, identity)
    done = read_done(out_dir)
    if world > 1:
        torch.distributed.barrier()  # every rank has read what was done before anyone writes
    todo, shard = plan_shard(samples, done, rank, world)
    if rank == 0 and done:
        print(f"resuming: {len(samples) - len(todo)} of {len(samples)} samples already scored", file=sys.stderr)

    model, tokenizer, _ = load_for_inference(args, device)
    settings = EvalSettings(batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            workers=args.workers, progress=not args.no_progress)
    run_shard(model, tokenizer, shard, os.path.join(out_dir, f"predictions.rank{rank}.jsonl"), settings,
              on_batch, rank)
    if world > 1:
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    summary = {}
    if rank == 0:
        merged = read_done(out_dir)
        records = [merged[k] for k in keys if k in merged]
        summary = summarize(records)
        write_reports(out_dir, records, summary, model_name, args.cases)
        with open(os.path.join(out_dir, "results.md")) as f:
            print(f.read())
        print(f"results: {os.path.join(out_dir, 'results.json')}; pictures: {os.path.join(out_dir, 'cases.html')}",
              file=sys.stderr)
    return summary


def main(argv=None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    evaluate(argv)
    return 0


if __name__ == "__main__":
    sys.exit(main())
