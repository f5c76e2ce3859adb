"""Benchmark readers on small files in each benchmark's published format, and the metrics
on cases worked by hand."""
import json
import pickle

import pytest

from fastground import benchmarks as B


# ----------------------------------------------------------------------------- RefCOCO
def _write_refcoco(root, refs_name="refs(unc).p"):
    # As the refer toolkit ships them: a pickled list of ref dicts, COCO instances.json.
    refs = [
        {"ref_id": 7, "ann_id": 70, "image_id": 1, "split": "val", "category_id": 1,
         "file_name": "COCO_train2014_000000000001_70.jpg", "sent_ids": [100, 101],
         "sentences": [{"tokens": ["man", "on", "left"], "raw": "Man on left", "sent_id": 100, "sent": "man on left"},
                       {"tokens": ["guy"], "raw": "guy", "sent_id": 101, "sent": "guy"}]},
        {"ref_id": 8, "ann_id": 80, "image_id": 2, "split": "testA", "category_id": 1,
         "file_name": "COCO_train2014_000000000002_80.jpg", "sent_ids": [102],
         "sentences": [{"tokens": ["woman"], "raw": "woman", "sent_id": 102, "sent": "woman"}]},
        {"ref_id": 9, "ann_id": 90, "image_id": 2, "split": "train", "category_id": 1,
         "file_name": "x.jpg", "sent_ids": [103],
         "sentences": [{"tokens": ["dog"], "raw": "dog", "sent_id": 103, "sent": "dog"}]},
    ]
    inst = {"images": [{"id": 1, "file_name": "COCO_train2014_000000000001.jpg", "width": 640, "height": 480},
                       {"id": 2, "file_name": "COCO_train2014_000000000002.jpg", "width": 300, "height": 500}],
            "annotations": [{"id": 70, "image_id": 1, "bbox": [100.0, 20.0, 200.0, 100.0], "category_id": 1},
                            {"id": 80, "image_id": 2, "bbox": [0.0, 0.0, 300.0, 250.0], "category_id": 1},
                            {"id": 90, "image_id": 2, "bbox": [1.0, 1.0, 2.0, 2.0], "category_id": 1}],
            "categories": [{"id": 1, "name": "person"}]}
    with open(root / refs_name, "wb") as f:
        pickle.dump(refs, f, protocol=2)
    (root / "instances.json").write_text(json.dumps(inst))


def test_refcoco_reader_boxes_in_the_padded_square(tmp_path):
    _write_refcoco(tmp_path)
    samples = B.read_refcoco(str(tmp_path), "refcoco", image_root="/coco")
    assert [s.id for s in samples] == ["val/100", "val/101", "testA/102"]  # train split not read
    s = samples[0]
    assert s.question == "Output the coordinate of man on left"
    assert s.media == "/coco/COCO_train2014_000000000001.jpg"
    # 640x480 pads to 640x640 with 80 rows on top: xywh (100,20,200,100) -> (100,100,300,200)/640
    assert s.target == pytest.approx((100 / 640, 100 / 640, 300 / 640, 200 / 640))
    # 300x500 pads to 500 with 100 columns on the left: (0,0,300,250) -> (100,0,400,250)/500
    assert samples[2].target == pytest.approx((0.2, 0.0, 0.8, 0.5))
    assert [s.split for s in B.read_refcoco(str(tmp_path), "refcoco", ["testA"])] == ["testA"]


def test_refcocog_reads_umd_and_errors_name_the_file(tmp_path):
    _write_refcoco(tmp_path, "refs(umd).p")
    assert [s.split for s in B.read_refcoco(str(tmp_path), "refcocog")] == ["val", "val"]  # umd: val, test
    with pytest.raises(B.BenchmarkFormatError, match=r"refs\(umd\).p: no sentences in splits \['test'\]"):
        B.read_refcoco(str(tmp_path), "refcocog", ["test"])
    (tmp_path / "refs(umd).p").write_bytes(pickle.dumps({"not": "a list"}))
    with pytest.raises(B.BenchmarkFormatError, match=r"refs\(umd\).p: expected a list"):
        B.read_refcoco(str(tmp_path), "refcocog")

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    (tmp_path / "refs(umd).p").write_bytes(pickle.dumps([Evil()]))
    with pytest.raises(B.BenchmarkFormatError, match="refusing to load"):
        B.read_refcoco(str(tmp_path), "refcocog")
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\).p"):
        B.read_refcoco(str(tmp_path / "nothing"), "refcoco")


def test_rec_metric_hand_worked():
    target = (0.0, 0.0, 0.5, 0.5)
    s = B.Sample("val/1", "refcoco", "val", "image", "x.jpg", "q", target)
    # half the width: IoU 0.5 exactly, a hit
    assert B.score(s, "It is at [0.0,0.0,0.25,0.5].")["iou"] == pytest.approx(0.5)
    # shifted by half its width: inter 0.25*0.5, union 2*0.25-0.125 -> 1/3, a miss
    assert B.score(s, "[0.25,0.0,0.75,0.5]")["iou"] == pytest.approx(1 / 3)
    assert B.score(s, "no box here") == {"pred": None, "iou": 0.0}
    # Scored on the image's pixels: 640x480 padded with 80 rows above and below. True box
    # xywh (100,20,200,100) = pixels (100,20)-(300,120). The prediction (100,0)-(300,200) in
    # the padded square reaches 80 rows into the top padding: cut at the border it is
    # (100,0)-(300,120) on the image, IoU 100/120 (in the square it would be 100/200, a miss).
    real = B.Sample("val/2", "refcoco", "val", "image", "x.jpg", "q", B.box_to_relative((100, 20, 300, 120), 640, 480),
                    meta={"bbox_xywh": [100, 20, 200, 100], "width": 640, "height": 480})
    assert B.score(real, f"[{100 / 640:.6f},0.0,{300 / 640:.6f},{200 / 640:.6f}]")["iou"] == pytest.approx(100 / 120)
    recs = [{"split": "val", "iou": 0.5}, {"split": "val", "iou": 1 / 3}, {"split": "val", "iou": 0.0},
            {"split": "val", "iou": 0.9}, {"split": "testA", "iou": 0.49}]
    assert B.rec_metrics(recs) == {"val": {"Acc@0.5": 50.0, "n": 4}, "testA": {"Acc@0.5": 0.0, "n": 1}}
    table = B.markdown_table("refcoco", B.rec_metrics(recs), "ours")
    assert table.splitlines()[2] == "| | val | testA |"
    assert table.splitlines()[3] == "| ours | 50.00 | 0.00 |"


# ------------------------------------------------------------------------ Charades-STA
def test_charades_reader_and_recall(tmp_path):
    ann = tmp_path / "charades_sta_test.txt"
    ann.write_text("3MSZA 24.3 30.4##person turned a light on.\nAO8RW 0.0 6.9##A person is putting a book on a shelf.\n\n")
    lengths = tmp_path / "Charades_v1_test.csv"
    lengths.write_text("id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
                       "3MSZA,s1,Kitchen,6,7,Yes,x,a,d,c092 24.3 30.4,30.4\n"
                       "AO8RW,s2,Bedroom,6,7,Yes,x,a,d,c001 0 6.9,23.0\n")
    samples = B.read_charades(str(ann), str(tmp_path / "vids"), str(lengths))
    assert [s.id for s in samples] == ["test/1", "test/2"]
    a, b = (B.resolve_span_target(s) for s in samples)
    assert a.question == "When did person turned a light on occur in the video?"
    assert a.target == pytest.approx((24.3 / 30.4, 1.0)) and b.target == pytest.approx((0.0, 0.3))
    assert a.media.endswith("vids/3MSZA.mp4")
    # span (0.0,0.3) vs pred (0.1,0.3): IoU 2/3; vs (0.15,0.45): 0.15/0.45 = 1/3
    assert B.score(b, "{0.10,0.30}")["iou"] == pytest.approx(2 / 3)
    assert B.score(b, "from [0.15,0.45]")["iou"] == pytest.approx(1 / 3)
    m = B.sta_metrics([{"iou": 2 / 3}, {"iou": 1 / 3}, {"iou": 0.75}, {"iou": 0.0}])
    assert m == {"R@1,IoU=0.3": 75.0, "R@1,IoU=0.5": 50.0, "R@1,IoU=0.7": 25.0, "mIoU": 43.75, "n": 4}
    assert "| | R@1(IoU=0.3) | R@1(IoU=0.5) | R@1(IoU=0.7) | mIoU |" in B.markdown_table("charades", m)
    ann.write_text("3MSZA 24.3##broken\n")
    with pytest.raises(B.BenchmarkFormatError, match="line 1 is not 'VID START END##sentence'"):
        B.read_charades(str(ann))


# -------------------------------------------------------------------------------- POPE
def test_pope_reader_answer_reading_and_metrics(tmp_path):
    for sub in B.POPE_SUBSETS:
        with open(tmp_path / f"coco_pope_{sub}.json", "w") as f:
            f.write(json.dumps({"question_id": 1, "image": "COCO_val2014_000000310196.jpg",
                                "text": "Is there a snowboard in the image?", "label": "yes"}) + "\n")
            f.write(json.dumps({"question_id": 2, "image": "COCO_val2014_000000310196.jpg",
                                "text": "Is there a dog in the image?", "label": "no"}) + "\n")
    samples = B.read_pope(str(tmp_path), image_root="/coco/val2014")
    assert len(samples) == 6 and samples[0].id == "random/1" and samples[0].target == "yes"
    assert samples[1].media == "/coco/val2014/COCO_val2014_000000310196.jpg"
    # LLaVA's reading: first sentence only; "no"/"not"/"No" as a word -> no
    assert B.pope_answer("No, there is not.") == "no"
    assert B.pope_answer("Yes. But no dog.") == "yes"
    assert B.pope_answer("There is not a dog") == "no"
    assert B.pope_answer("Nothing") == "yes"
    # 4 yes-labels, 4 no-labels; predictions: TP 3, FN 1, FP 1, TN 3
    recs = [{"split": "random", "pred": p, "target": t} for p, t in
            [("yes", "yes")] * 3 + [("no", "yes")] + [("yes", "no")] + [("no", "no")] * 3]
    m = B.pope_metrics(recs)["random"]
    assert m == {"Accuracy": 75.0, "Precision": 75.0, "Recall": 75.0, "F1-Score": 75.0, "Yes": 50.0, "n": 8}
    (tmp_path / "coco_pope_random.json").write_text('{"question_id": 1, "image": "a.jpg", "text": "q", "label": "maybe"}\n')
    with pytest.raises(B.BenchmarkFormatError, match="coco_pope_random.json: line 1: label 'maybe'"):
        B.read_pope(str(tmp_path))
