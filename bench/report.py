"""Turn every results file under bench/results/ into BENCHMARKS.md.

    python bench/report.py            # writes BENCHMARKS.md at the repository root
    python bench/report.py --stdout   # prints it instead

Every figure in BENCHMARKS.md comes from a results file written by a run of
`pytest bench/ --benchmark-only`; with no GPU results file the page says so. Targets are
reported against, never asserted; a missed target is marked MISSED.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS_DIR = HERE / "results"
OUT = HERE.parent / "BENCHMARKS.md"

BASELINE = {"decode_video": "pyav", "decode_audio": "pyav", "decode_clip": "float", "frozen_encoders": "media"}   # everything else: eager
TARGET_BATCH = 8
VIDEO_VS_EAGER, VIDEO_VS_COMPILE = 4.0, 1.5
ADAPTER_PCT = 85.0
DALI_SPEEDUP = 5.0
CLIP_SPEEDUP = 3.0

COLUMNS = ("bench", "mode", "batch", "variant", "time ms", "floor ms (bound)", "time/floor", "TFLOP/s",
           "% matmul", "samples/s", "peak GiB", "speedup", "vs compile", "notes")


# ---------------------------------------------------------------------------- loading
def load_results(results_dir: Path = RESULTS_DIR) -> list[dict]:
    out = []
    for p in sorted(results_dir.glob("*.json")):
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"skipping {p.name}: {e}", file=sys.stderr)
            continue
        d["_file"] = p.name
        out.append(d)
    # GPU files first: they carry the release-shape figures
    return sorted(out, key=lambda d: (d.get("device_info", {}).get("kind") != "cuda", d["_file"]))


# ---------------------------------------------------------------------------- figures
def _fmt(x, spec: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return format(x, spec)


def _key(c: dict) -> tuple:
    return (c["bench"], c["mode"], c["batch"], c["shape"])


def _times(cases: list[dict]) -> dict:
    t: dict = {}
    for c in cases:
        t.setdefault(_key(c), {})[c["variant"]] = c["time_ms"]
    return t


def rows(cases: list[dict]) -> list[list[str]]:
    times = _times(cases)
    out = []
    for c in cases:
        peers = times[_key(c)]
        base = BASELINE.get(c["bench"], "eager")
        speedup = (f"{peers[base] / c['time_ms']:.2f}x vs {base}"
                   if c["variant"] != base and base in peers else "")
        vs_compile = (f"{peers['compile'] / c['time_ms']:.2f}x"
                      if c["variant"] not in ("compile", base) and "compile" in peers else "")
        floor = (f"{c['floor_ms']:.3g} ({c['floor_bound']})" if c.get("floor_ms") is not None else "n/a")
        notes = []
        if c.get("mfu") is not None:
            notes.append(f"MFU {100 * c['mfu']:.1f}% of {c['peak_tflops']:.0f} TFLOP/s datasheet")
        if c.get("tokens_per_s"):
            notes.append(f"{c['tokens_per_s']:.3g} tok/s")
        if c.get("rel_err_vs_eager") is not None:
            notes.append(f"rel err {c['rel_err_vs_eager']:.1e}")
        if c.get("dali_device"):
            notes.append(f"DALI {c['dali_device']}")
        if c.get("dali_fell_back_to_pyav"):
            notes.append("DALI fell back to PyAV on some files")
        out.append([c["bench"], c["mode"], str(c["batch"]), c["variant"], _fmt(c["time_ms"], ".4g"), floor,
                    _fmt(c.get("ratio"), ".3g"), _fmt(c.get("tflops"), ".3g"), _fmt(c.get("pct_matmul_rate"), ".1f"),
                    _fmt(c.get("samples_per_s"), ".4g"), _fmt(c.get("peak_mem_gib"), ".2f"), speedup, vs_compile,
                    "; ".join(notes)])
    return out


def text_table(cases: list[dict]) -> list[str]:
    table = [list(COLUMNS)] + rows(cases)
    widths = [max(len(r[i]) for r in table) for i in range(len(COLUMNS))]
    return ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in table]


def markdown_table(cases: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows(cases)]
    return lines


# ---------------------------------------------------------------------------- targets
def _find(cases, bench, variant, mode=None, batch=None) -> dict | None:
    for c in cases:
        if c["bench"] == bench and c["variant"] == variant and (mode is None or c["mode"] == mode) \
                and (batch is None or c["batch"] == batch):
            return c
    return None


def _skip_reason(result: dict, *tokens: str) -> str | None:
    for s in result.get("skipped", []):
        if all(t in s["case"] for t in tokens):
            return s["reason"]
    return None


def _missing(result, what: str, *tokens: str) -> str:
    reason = _skip_reason(result, *tokens)
    return f"not measured: {what}" + (f" ({reason})" if reason else " (no figure in the results)")


def targets(result: dict) -> list[tuple[str, str, str]]:
    """(target, measured, status) rows; status is met, MISSED, reported or not measured."""
    cases = result.get("cases", [])
    tiny = result.get("shapes") == "tiny"
    b = TARGET_BATCH if not tiny else min((c["batch"] for c in cases if c["bench"] == "video_branch"),
                                          default=TARGET_BATCH)
    out = []

    # 1. video branch training pass
    name = (f"video branch fwd+bwd, batch {b}: fast >= {VIDEO_VS_EAGER:g}x eager and "
            f">= {VIDEO_VS_COMPILE:g}x torch.compile")
    fast, eager, comp = (_find(cases, "video_branch", v, "fwd+bwd", b) for v in ("fast", "eager", "compile"))
    if fast and eager:
        a = eager["time_ms"] / fast["time_ms"]
        measured = f"{a:.2f}x eager"
        ok = a >= VIDEO_VS_EAGER
        if comp:
            c = comp["time_ms"] / fast["time_ms"]
            measured += f", {c:.2f}x compile"
            ok = ok and c >= VIDEO_VS_COMPILE
            status = "met" if ok else "MISSED"
        else:
            status = ("MISSED" if not ok else "met vs eager; ") + \
                     ("" if not ok else _missing(result, "compile", "test_video_branch", "compile", "fwd+bwd", f"b{b}"))
        out.append((name, measured, status))
    else:
        which = "fast" if not fast else "eager"
        out.append((name, "-", _missing(result, which, "test_video_branch", which, "fwd+bwd", f"b{b}")))

    # 2. image adapter matmul efficiency
    name = f"image adapter: fast >= {ADAPTER_PCT:g}% of the measured matmul rate"
    fast_rows = [c for c in cases if c["bench"] == "image_adapter" and c["variant"] == "fast"]
    if fast_rows:
        for c in fast_rows:
            pct = c.get("pct_matmul_rate")
            eager = _find(cases, "image_adapter", "eager", c["mode"], c["batch"])
            ref = f" (eager {eager['pct_matmul_rate']:.1f}%)" if eager and eager.get("pct_matmul_rate") else ""
            out.append((f"{name} [{c['mode']}, batch {c['batch']}]", f"{pct:.1f}%{ref}",
                        "met" if pct >= ADAPTER_PCT else "MISSED"))
    else:
        eager_rows = [c for c in cases if c["bench"] == "image_adapter" and c["variant"] == "eager"]
        ref = ", ".join(f"eager {c['mode']} b{c['batch']}: {c['pct_matmul_rate']:.1f}%" for c in eager_rows)
        out.append((name, ref or "-", _missing(result, "fast", "test_image_adapter", "fast")))

    # 3. decoding
    for media in ("video", "audio"):
        name = f"{media} decoding: DALI >= {DALI_SPEEDUP:g}x PyAV samples/s"
        pyav, dali = _find(cases, f"decode_{media}", "pyav"), _find(cases, f"decode_{media}", "dali")
        if pyav and dali:
            s = dali["samples_per_s"] / pyav["samples_per_s"]
            measured = f"{s:.2f}x ({dali['samples_per_s']:.3g} vs {pyav['samples_per_s']:.3g} samples/s)"
            status = "met" if s >= DALI_SPEEDUP else "MISSED"
            if dali.get("dali_fell_back_to_pyav"):
                status += " (DALI fell back to PyAV on some files)"
            out.append((name, measured, status))
        else:
            which = "pyav" if not pyav else "dali"
            out.append((name, "-", _missing(result, which, "test_decoding", media, which)))

    # 3b. the trainer's video path on a real-sized clip (issue 10) vs the float loader before it
    old = _find(cases, "decode_clip", "float", "720p h264")
    for variant, what in (("uint8", "trainer's default video path (pyav)"),
                          ("uint8-scale", "--video-backend pyav-scale")):
        name = f"720p H.264 clip decoding: {what} >= {CLIP_SPEEDUP:g}x the float loader's samples/s"
        new = _find(cases, "decode_clip", variant, "720p h264")
        if old and new:
            s = new["samples_per_s"] / old["samples_per_s"]
            out.append((name, f"{s:.2f}x ({new['samples_per_s']:.3g} vs {old['samples_per_s']:.3g} samples/s)",
                        "met" if s >= CLIP_SPEEDUP else "MISSED"))
        else:
            out.append((name, "-", _missing(result, variant if old else "float", "test_decoding", "clip")))

    # 4. training-step MFU, fast next to the reference path
    steps = sorted({(c["mode"], c["batch"]) for c in cases if c["bench"] == "train_step"}, key=lambda k: k[1])
    if not steps:
        out.append(("training-step MFU, fast next to reference", "-",
                    _missing(result, "training step", "test_train_step")))
    for mode, batch in steps:
        name = f"training-step MFU, {mode}, batch {batch}: fast next to reference (eager)"
        parts = []
        for v in ("eager", "compile", "fast"):
            c = _find(cases, "train_step", v, mode, batch)
            if c and c.get("mfu") is not None:
                parts.append(f"{v} {100 * c['mfu']:.1f}% (cuBLAS-relative {c['pct_matmul_rate']:.1f}%)")
        status = "reported" if _find(cases, "train_step", "fast", mode, batch) else \
            _missing(result, "fast", "test_train_step", "fast", f"b{batch}")
        out.append((name, ", ".join(parts) or "-", status))
    cpu = result.get("device_info", {}).get("kind", "cuda" if not tiny else "cpu") != "cuda"

    def note(n: str) -> str:
        if "decoding" in n:      # decoding always runs at the release's sampling
            return " (CPU decoders)" if cpu else ""
        return " (tiny CPU shapes: not the target's setting)" if tiny else ""
    return [(n, m, s + note(n)) for n, m, s in out]


def target_lines(result: dict) -> list[str]:
    return ["targets (reported, not asserted):"] + [f"  [{s}] {n}: {m}" for n, m, s in targets(result)]


# ---------------------------------------------------------------------------- page
def _header(r: dict) -> list[str]:
    v = r.get("versions", {})
    c = r.get("ceilings") or {}
    dev = r.get("device_info", {})
    lines = [f"## {r.get('device', '?')} ({r.get('shapes', '?')} shapes) — `bench/results/{r['_file']}`", ""]
    extra = ""
    if dev.get("kind") == "cuda":
        extra = f", {dev.get('sm_count')} SMs, {dev.get('memory_gib', 0):.0f} GiB, sm_{str(dev.get('capability', '')).replace('.', '')}"
    dirty = " (working tree had uncommitted changes)" if r.get("dirty") else ""
    lines += [
        f"- device: {r.get('device')}{extra}",
        f"- commit `{r.get('commit')}`{dirty}, run {r.get('date')}, {r.get('wall_s', 0):.0f} s",
        f"- command: `{r.get('command')}`",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in ("torch", "triton", "cuda", "cudnn", "transformers",
                                                             "dali", "av", "flash_attn", "python") if v.get(k)),
    ]
    if c:
        lines.append(f"- measured ceilings: copy {c['copy_bytes_per_s'] / 1e9:.1f} GB/s (device-to-device, "
                     f"read + write, {c['copy_nbytes'] / 2**20:.0f} MiB), matmul "
                     f"{c['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s ({c['matmul_dtype']}, {c['matmul_n']}^3)")
    return lines + [""]


def render(results: list[dict]) -> str:
    gpu = [r for r in results if r.get("device_info", {}).get("kind") == "cuda"]
    lines = ["# Benchmarks", "",
             "Generated by `python bench/report.py` from `bench/results/*.json` (written by "
             "`pytest bench/ --benchmark-only`); do not edit by hand. How to run and read: `bench/README.md`.", ""]
    if not gpu:
        lines += ["**No GPU results yet.** No results file from a GPU run exists under `bench/results/`, so "
                  "this page has no GPU figures. Run `bash bench/gpu_session.sh` on a GPU machine, commit the "
                  "JSON it writes, then `python bench/report.py`.", ""]
    if not results:
        return "\n".join(lines)
    lines += ["Columns: time is the median (CUDA events on GPU) over rotated input sets after warm-up; floor "
              "is max(FLOPs / measured matmul rate, bytes / measured copy bandwidth) from `bench/floors.py`, "
              "with the ceiling that sets it; time/floor is how far from that floor; % matmul is achieved "
              "FLOP/s over the matmul rate measured in the run (cuBLAS); MFU is model FLOP/s over the "
              "datasheet's dense bf16 peak, the trainer's definition (fastground.train.metrics.mfu); speedup is "
              "against the reference eager path (PyAV for decoding). Targets are reported, never asserted.", ""]
    for r in results:
        lines += _header(r)
        lines += ["### Targets", "", "| target | measured | status |", "|---|---|---|"]
        lines += [f"| {n} | {m} | {s} |" for n, m, s in targets(r)]
        lines += ["", "### Figures", ""]
        lines += markdown_table(r.get("cases", [])) if r.get("cases") else ["No case ran."]
        if r.get("failed"):
            lines += ["", "### Failed", ""] + [f"- `{n}`" for n in r["failed"]]
        if r.get("skipped"):
            lines += ["", "### Not run", ""] + [f"- `{s['case'].split('::')[-1]}`: {s['reason']}"
                                                for s in r["skipped"]]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--stdout", action="store_true", help="print instead of writing the file")
    args = ap.parse_args(argv)
    page = render(load_results(args.results_dir)) + "\n"
    if args.stdout:
        sys.stdout.write(page)
    else:
        args.out.write_text(page)
        print(f"wrote {args.out.name} from {len(load_results(args.results_dir))} results file(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
