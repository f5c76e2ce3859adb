"""The paper's grounding benchmarks, read from their published files and scored.

* RefCOCO / RefCOCO+ / RefCOCOg (paper Table 2): `refs(unc).p` (RefCOCO, RefCOCO+) or
  `refs(umd).p` (RefCOCOg) - a pickled list of refs {ref_id, ann_id, image_id, split,
  sentences: [{sent, ...}]} - plus `instances.json` (COCO: images {id, file_name, width,
  height}, annotations {id, image_id, bbox: [x, y, w, h] in pixels}). One sample per
  sentence; the target box becomes relative to the padded square, as the model writes it.
  Prompt "Output the coordinate of <exp>"; metric Acc@0.5 per split, the IoU taken on the
  original image's pixels (a predicted box is mapped back and cut at the image border).
* Charades-STA (Table 3): `charades_sta_test.txt`, lines `VID START END##sentence`
  (seconds). Durations from `Charades_v1_test.csv` (`id`, `length`) when given, else read
  from the video file. Metric R@1 at IoU 0.3/0.5/0.7 and mIoU.
* POPE (Table 6): `coco_pope_{random,popular,adversarial}.json`, one JSON object per line
  {question_id, image, text, label: "yes"|"no"}. Answers read as LLaVA's POPE script does
  (first sentence; "no"/"not" means no). Metrics accuracy, precision, recall, F1, yes-ratio.

Pure Python (no torch), so results can be rescored anywhere.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

from fastground.grounding import box_iou, box_to_pixels, box_to_relative, parse_box, parse_span, span_iou

REC_PROMPT = "Output the coordinate of {exp}"  # paper, section 4.2.1
STA_PROMPT = "When did {exp} occur in the video?"  # paper Table 11, temporal grounding
POPE_PROMPT = "{exp}"

REC_TASKS = {"refcoco": ("unc", ("val", "testA", "testB")),
             "refcoco+": ("unc", ("val", "testA", "testB")),
             "refcocog": ("umd", ("val", "test"))}
POPE_SUBSETS = ("random", "popular", "adversarial")
STA_THRESHOLDS = (0.3, 0.5, 0.7)
TASKS = tuple(REC_TASKS) + ("charades", "pope")


class BenchmarkFormatError(ValueError):
    """A benchmark file that does not follow its published format."""

    def __init__(self, path: str, problem: str):
        super().__init__(f"{path}: {problem}")


@dataclass
class Sample:
    id: str  # unique within a task; the resume key
    task: str
    split: str
    modality: str  # image | video
    media: str  # path to the media file
    question: str  # without template or placeholder
    target: Any  # relative box (4), relative span (2) or "yes"/"no"
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- RefCOCO
class _PlainUnpickler(pickle.Unpickler):
    """refs(*).p holds only lists, dicts, strings and numbers; refusing every class keeps a
    hostile pickle from running code."""

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: the refs file should hold plain data")


def _load_refs(path: str) -> list:
    try:
        with open(path, "rb") as f:
            refs = _PlainUnpickler(f, encoding="utf-8").load()
    except (pickle.UnpicklingError, EOFError, UnicodeDecodeError, ValueError) as e:
        raise BenchmarkFormatError(path, f"not a refs pickle ({e})") from None
    if not isinstance(refs, list):
        raise BenchmarkFormatError(path, f"expected a list of refs, got {type(refs).__name__}")
    return refs


def refs_file(data_dir: str, task: str) -> str:
    """`refs(umd).p` for RefCOCOg, `refs(unc).p` otherwise; a lone refs(*).p is taken too."""
    want = os.path.join(data_dir, f"refs({REC_TASKS[task][0]}).p")
    if os.path.isfile(want):
        return want
    found = sorted(f for f in os.listdir(data_dir) if re.fullmatch(r"refs\(\w+\)\.p", f)) if os.path.isdir(data_dir) else []
    if len(found) == 1:
        return os.path.join(data_dir, found[0])
    raise FileNotFoundError(f"{data_dir}: no {os.path.basename(want)} (the {task} annotation file)"
                            + (f"; found {found}" if found else ""))


def read_refcoco(data_dir: str, task: str = "refcoco", splits: Sequence[str] | None = None,
                 image_root: str | None = None) -> list[Sample]:
    """One sample per referring sentence of the chosen splits."""
    if task not in REC_TASKS:
        raise ValueError(f"unknown REC task {task!r}; choose one of {sorted(REC_TASKS)}")
    splits = tuple(splits or REC_TASKS[task][1])
    rpath = refs_file(data_dir, task)
    ipath = os.path.join(data_dir, "instances.json")
    if not os.path.isfile(ipath):
        raise FileNotFoundError(f"{data_dir}: no instances.json (the {task} boxes and image sizes)")
    with open(ipath) as f:
        try:
            inst = json.load(f)
        except json.JSONDecodeError as e:
            raise BenchmarkFormatError(ipath, f"not valid JSON ({e})") from None
    try:
        images = {im["id"]: im for im in inst["images"]}
        anns = {a["id"]: a for a in inst["annotations"]}
    except (KeyError, TypeError) as e:
        raise BenchmarkFormatError(ipath, f"missing COCO field {e}") from None
    image_root = image_root or os.path.join(data_dir, "images")
    out: list[Sample] = []
    for k, ref in enumerate(_load_refs(rpath)):
        try:
            split = ref["split"]
            if split not in splits:
                continue
            ann = anns[ref["ann_id"]]
            im = images[ref["image_id"]]
            x, y, w, h = (float(v) for v in ann["bbox"])
            width, height = int(im["width"]), int(im["height"])
            sents = ref["sentences"]
        except KeyError as e:
            raise BenchmarkFormatError(rpath, f"ref #{k} (ref_id {ref.get('ref_id')}) lacks {e} "
                                              "or points at an annotation/image not in instances.json") from None
        target = box_to_relative((x, y, x + w, y + h), width, height)
        for j, s in enumerate(sents):
            sent = s["sent"] if isinstance(s, dict) else str(s)
            sid = s.get("sent_id", f"{ref['ref_id']}-{j}") if isinstance(s, dict) else f"{ref['ref_id']}-{j}"
            out.append(Sample(
                id=f"{split}/{sid}", task=task, split=split, modality="image",
                media=os.path.join(image_root, im["file_name"]), question=REC_PROMPT.format(exp=sent.strip()),
                target=target, meta={"ref_id": ref["ref_id"], "bbox_xywh": [x, y, w, h],
                                     "width": width, "height": height, "expression": sent}))
    if not out:
        raise BenchmarkFormatError(rpath, f"no sentences in splits {list(splits)}")
    return out


# ------------------------------------------------------------------------ Charades-STA
_STA_LINE = re.compile(r"^(\S+) (\d+(?:\.\d*)?) (\d+(?:\.\d*)?)##(.+)$")


def read_durations(csv_path: str) -> dict[str, float]:
    """Charades_v1_{train,test}.csv: video id -> length in seconds."""
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"id", "length"} <= set(rows[0]):
        raise BenchmarkFormatError(csv_path, "expected the Charades columns 'id' and 'length'")
    return {r["id"]: float(r["length"]) for r in rows}


def _probe_duration(path: str) -> float:
    import av

    with av.open(path) as c:
        if c.duration:
            return c.duration / 1e6
        s = c.streams.video[0]
        if s.duration:
            return float(s.duration * s.time_base)
        if s.frames and s.average_rate:
            return float(s.frames / s.average_rate)
    raise ValueError(f"{path}: the container states no duration")


_VIDEO_EXTS = (".mp4", ".webm", ".mkv", ".avi", ".mov")


def _video_path(root: str, vid: str, ext: str) -> str:
    """root/vid+ext, or the first other common container that exists (Charades ships .mp4;
    re-encoded copies are often .webm)."""
    first = os.path.join(root, vid + ext)
    if os.path.exists(first):
        return first
    for e in _VIDEO_EXTS:
        p = os.path.join(root, vid + e)
        if os.path.exists(p):
            return p
    return first


def read_charades(annotation: str, video_root: str | None = None, durations: str | None = None,
                  ext: str = ".mp4", split: str = "test") -> list[Sample]:
    """One sample per line of charades_sta_{split}.txt."""
    video_root = video_root or os.path.join(os.path.dirname(annotation), "videos")
    lengths = read_durations(durations) if durations else {}
    out: list[Sample] = []
    with open(annotation, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            m = _STA_LINE.match(line)
            if not m:
                raise BenchmarkFormatError(annotation, f"line {n} is not 'VID START END##sentence': {line[:80]!r}")
            vid, s, e, sent = m.group(1), float(m.group(2)), float(m.group(3)), m.group(4).strip()
            media = _video_path(video_root, vid, ext)
            if vid in lengths:
                dur = lengths[vid]
            elif durations:
                raise BenchmarkFormatError(durations, f"no length for video {vid} (line {n} of {annotation})")
            else:
                dur = None  # probed when the sample is loaded
            exp = sent.rstrip(".").strip()
            exp = exp[:1].lower() + exp[1:]
            out.append(Sample(
                id=f"{split}/{n}", task="charades", split=split, modality="video", media=media,
                question=STA_PROMPT.format(exp=exp), target=None,
                meta={"video": vid, "seconds": [s, e], "duration": dur, "sentence": sent}))
    if not out:
        raise BenchmarkFormatError(annotation, "no annotation lines")
    return out


def resolve_span_target(sample: Sample) -> Sample:
    """Fill a Charades sample's relative target (needs the duration, probed if not given)."""
    if sample.target is None:
        dur = sample.meta.get("duration") or _probe_duration(sample.media)
        sample.meta["duration"] = dur
        s, e = sample.meta["seconds"]
        sample.target = (min(max(s / dur, 0.0), 1.0), min(max(e / dur, 0.0), 1.0))
    return sample


# -------------------------------------------------------------------------------- POPE
def read_pope(data_dir: str, subsets: Sequence[str] = POPE_SUBSETS, image_root: str | None = None,
              prefix: str = "coco_pope_") -> list[Sample]:
    image_root = image_root or os.path.join(data_dir, "images")
    out: list[Sample] = []
    for sub in subsets:
        path = os.path.join(data_dir, f"{prefix}{sub}.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{data_dir}: no {prefix}{sub}.json (the POPE {sub} subset)")
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    q = json.loads(line)
                    qid, image, text, label = q["question_id"], q["image"], q["text"], q["label"]
                except (json.JSONDecodeError, KeyError, TypeError) as e:
                    raise BenchmarkFormatError(path, f"line {n}: not a POPE question ({type(e).__name__}: {e})") from None
                if label not in ("yes", "no"):
                    raise BenchmarkFormatError(path, f"line {n}: label {label!r} is not 'yes' or 'no'")
                out.append(Sample(id=f"{sub}/{qid}", task="pope", split=sub, modality="image",
                                  media=os.path.join(image_root, image), question=POPE_PROMPT.format(exp=text),
                                  target=label, meta={"question_id": qid}))
    return out


def pope_answer(text: str) -> str:
    """LLaVA's POPE reading: first sentence, commas dropped, 'no'/'not'/'No' as a word -> no."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in ("No", "not", "no") for w in words) else "yes"


# ----------------------------------------------------------------------------- scoring
def score(sample: Sample, answer: str) -> dict:
    """Per-sample record: the parsed prediction and its score (iou or correct)."""
    if sample.task in REC_TASKS:
        pred = parse_box(answer)
        if pred is None:
            return {"pred": None, "iou": 0.0}
        w, h = sample.meta.get("width"), sample.meta.get("height")
        if w and h:
            # Scored on the original image: the part of a box on the padding points at no
            # pixel, so it is cut off (box_to_pixels) before the IoU with the true pixel box.
            x, y, bw, bh = sample.meta["bbox_xywh"]
            iou = box_iou(box_to_pixels(pred, w, h, clip=True), (x, y, x + bw, y + bh))
        else:
            iou = box_iou(pred, sample.target)
        return {"pred": list(pred), "iou": iou}
    if sample.task == "charades":
        pred = parse_span(answer)
        iou = span_iou(pred, sample.target) if pred is not None else 0.0
        return {"pred": list(pred) if pred else None, "iou": iou}
    if sample.task == "pope":
        pred = pope_answer(answer)
        return {"pred": pred, "correct": float(pred == sample.target)}
    raise ValueError(f"unknown task {sample.task!r}")


def _pct(x: float) -> float:
    return round(100.0 * x, 2)


def rec_metrics(records: Iterable[dict]) -> dict:
    """{split: {"Acc@0.5": %, "n": count}} from per-sample records (split, iou)."""
    by: dict[str, list[float]] = {}
    for r in records:
        by.setdefault(r["split"], []).append(r["iou"])
    return {s: {"Acc@0.5": _pct(sum(i >= 0.5 - 1e-9 for i in v) / len(v)), "n": len(v)} for s, v in by.items()}


def sta_metrics(records: Iterable[dict], thresholds: Sequence[float] = STA_THRESHOLDS) -> dict:
    ious = [r["iou"] for r in records]
    if not ious:
        return {}
    out = {f"R@1,IoU={t:g}": _pct(sum(i >= t - 1e-9 for i in ious) / len(ious)) for t in thresholds}
    out["mIoU"] = _pct(sum(ious) / len(ious))
    out["n"] = len(ious)
    return out


def pope_metrics(records: Iterable[dict]) -> dict:
    """Per subset: accuracy, precision, recall, F1 (positive = yes) and yes-ratio, in %."""
    by: dict[str, list[tuple[str, str]]] = {}
    for r in records:
        by.setdefault(r["split"], []).append((r["pred"], r["target"]))
    out = {}
    for sub, pairs in by.items():
        tp = sum(p == "yes" and t == "yes" for p, t in pairs)
        fp = sum(p == "yes" and t == "no" for p, t in pairs)
        fn = sum(p == "no" and t == "yes" for p, t in pairs)
        tn = sum(p == "no" and t == "no" for p, t in pairs)
        n = len(pairs)
        prec = tp / (tp + fp) if tp + fp else 0.0
        rec = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
        out[sub] = {"Accuracy": _pct((tp + tn) / n), "Precision": _pct(prec), "Recall": _pct(rec),
                    "F1-Score": _pct(f1), "Yes": _pct((tp + fp) / n), "n": n}
    return out


def metrics(task: str, records: Sequence[dict]) -> dict:
    if task in REC_TASKS:
        return rec_metrics(records)
    if task == "charades":
        return sta_metrics(records)
    if task == "pope":
        return pope_metrics(records)
    raise ValueError(f"unknown task {task!r}")


# ------------------------------------------------------------------------------ tables
def markdown_table(task: str, result: dict, model_name: str = "this checkpoint") -> str:
    """The paper's table layout (Table 2 / 3 / 6) with one row for this checkpoint."""
    if task in REC_TASKS:
        splits = [s for s in REC_TASKS[task][1] if s in result] + [s for s in result if s not in REC_TASKS[task][1]]
        name = {"refcoco": "RefCOCO", "refcoco+": "RefCOCO+", "refcocog": "RefCOCOg"}[task]
        head = f"| Models | {name} " + "| " * (len(splits) - 1) + "|\n"
        head += "|---|" + "---|" * len(splits) + "\n"
        head += "| | " + " | ".join(splits) + " |\n"
        return head + f"| {model_name} | " + " | ".join(f"{result[s]['Acc@0.5']:.2f}" for s in splits) + " |\n"
    if task == "charades":
        cols = [k for k in result if k.startswith("R@1")] + ["mIoU"]
        head = "| Models | Charades-STA " + "| " * (len(cols) - 1) + "|\n"
        head += "|---|" + "---|" * len(cols) + "\n"
        head += "| | " + " | ".join(c.replace(",", "(") + ")" if c.startswith("R@1") else c for c in cols) + " |\n"
        return head + f"| {model_name} | " + " | ".join(f"{result[c]:.2f}" for c in cols) + " |\n"
    if task == "pope":
        subs = [s for s in POPE_SUBSETS if s in result] + [s for s in result if s not in POPE_SUBSETS]
        head = "| Models | " + " | ".join(s.capitalize() + " | |" for s in subs) + "\n"
        head += "|---|" + "---|---|---|" * len(subs) + "\n"
        head += "| | " + " | ".join("Accuracy | F1-Score | Yes" for _ in subs) + " |\n"
        return head + f"| {model_name} | " + " | ".join(
            f"{result[s]['Accuracy']:.2f} | {result[s]['F1-Score']:.2f} | {result[s]['Yes']:.2f}" for s in subs) + " |\n"
    raise ValueError(f"unknown task {task!r}")
