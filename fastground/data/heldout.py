"""The demo set's held-out split, written in the published benchmark formats.

Pictures and clips are drawn by the demo generator from random streams of their own (never
in the training JSON), then written exactly as the real benchmarks ship, so
`python -m fastground.evaluate --task demo --data DEMO/heldout` runs the same readers a
RefCOCO, Charades-STA or POPE evaluation does:

* `refs(unc).p` + `instances.json` + `images/`: RefCOCO layout (split "val"), COCO xywh
  pixel boxes, one ref per object with two sentences;
* `charades_sta_test.txt` (`VID START END##sentence`, seconds) + `Charades_v1_test.csv`
  (`id`, `length`) + `videos/`;
* `coco_pope_{random,popular,adversarial}.json` (JSON lines: question_id, image, text,
  label) over the same images: for every object one "yes" question and one "no" question
  about an absent object drawn at random, from the most frequent objects, or from objects
  sharing a colour or shape with one present (POPE's three negative samplers).
"""
from __future__ import annotations

import csv
import json
import pickle
from collections import Counter
from pathlib import Path

import numpy as np


def write_heldout(out, seed: int, n_images: int, n_videos: int) -> Path:
    from fastground.data import demo

    root = Path(out)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    images, annotations, refs = [], [], []
    infos = []
    for i in range(n_images):
        img, info = demo._make_image(np.random.default_rng([int(seed), 11, i]))
        name = f"img_h{i:04d}.png"
        img.save(root / "images" / name, format="PNG")
        images.append({"id": i + 1, "file_name": name, "width": info["width"], "height": info["height"]})
        infos.append((name, info))
        for j, o in enumerate(info["objects"]):
            x1, y1, x2, y2 = o["box_px"]
            ann_id = (i + 1) * 10 + j
            annotations.append({"id": ann_id, "image_id": i + 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                "area": (x2 - x1) * (y2 - y1), "iscrowd": 0, "category_id": 1})
            obj = demo._obj_name(o)
            refs.append({"ref_id": ann_id, "ann_id": ann_id, "image_id": i + 1, "split": "val",
                         "category_id": 1, "file_name": name, "sent_ids": [ann_id * 10, ann_id * 10 + 1],
                         "sentences": [{"sent_id": ann_id * 10, "sent": obj, "raw": obj, "tokens": obj.split()},
                                       {"sent_id": ann_id * 10 + 1, "sent": f"the {obj}",
                                        "raw": f"the {obj}", "tokens": ["the"] + obj.split()}]})
    with open(root / "instances.json", "w") as f:
        json.dump({"images": images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "shape"}]}, f, sort_keys=True)
    with open(root / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=2)

    _write_pope(root, seed, infos)

    lines, lengths = [], []
    for i in range(n_videos):
        vid = f"vid_h{i:04d}"
        info = demo._make_video(np.random.default_rng([int(seed), 12, i]), str(root / "videos" / f"{vid}.webm"))
        dur = info["n_frames"] / info["fps"]
        f_on, f_off = info["frames_visible"]
        lines.append(f"{vid} {f_on / info['fps']:.2f} {f_off / info['fps']:.2f}##"
                     f"a {info['color']} {info['shape']} appears.")
        lengths.append({"id": vid, "length": f"{dur:.2f}"})
    (root / "charades_sta_test.txt").write_text("\n".join(lines) + "\n")
    with open(root / "Charades_v1_test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["id", "length"])
        w.writeheader()
        w.writerows(lengths)
    return root


def _write_pope(root: Path, seed: int, infos: list) -> None:
    from fastground.data import demo

    every = [f"{c} {s}" for c in demo.COLORS for s in demo.SHAPES]
    freq = Counter(demo._obj_name(o) for _, info in infos for o in info["objects"])
    popular = [n for n, _ in freq.most_common()] + [n for n in every if n not in freq]
    subsets = {"random": [], "popular": [], "adversarial": []}
    for k, (name, info) in enumerate(infos):
        present = {demo._obj_name(o) for o in info["objects"]}
        absent = [n for n in every if n not in present]
        rng = np.random.default_rng([seed, 7, k])
        # Co-occurring stand-ins for POPE's adversarial sampler: same colour or same shape.
        close = [n for n in absent if any(n.split()[0] == p.split()[0] or n.split()[1] == p.split()[1]
                                          for p in present)] or absent
        pool = {"random": list(rng.permutation(absent)),
                "popular": [n for n in popular if n in absent],
                "adversarial": list(rng.permutation(close))}
        for sub, qs in subsets.items():
            for j, obj in enumerate(sorted(present)):
                qs.append({"image": name, "text": f"Is there a {obj} in the image?", "label": "yes"})
                qs.append({"image": name, "text": f"Is there a {pool[sub][j % len(pool[sub])]} in the image?",
                           "label": "no"})
    for sub, qs in subsets.items():
        with open(root / f"coco_pope_{sub}.json", "w") as f:
            for qid, q in enumerate(qs, 1):
                f.write(json.dumps({"question_id": qid, **q}) + "\n")
