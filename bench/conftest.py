"""Session plumbing of the bench suites: options, the shared context `fg`, case order,
the time budget, the printed summary and the results file.

`bench/` is a package, so this conftest imports as `bench.conftest` and never shadows
`tests/conftest.py`; `testpaths = ["tests"]` keeps plain `pytest` away from here.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest
import torch

from bench import harness

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
HAS_GPU = torch.cuda.is_available()

# Batch sizes of the release's stages (Table 9: 64, 16, 8); tiny shapes where CPU runs.
RELEASE_BATCHES = (8, 16, 64)
TINY_BATCHES = (2,)
# (stage, batch, sequence length). Stage 1 trains the adapters only on short caption data;
# stages 2 and 3 train the LLM too at the release's max length.
RELEASE_TRAIN = ((3, 8, 2048), (2, 16, 2048), (1, 64, 1024))
TINY_TRAIN = ((3, 2, 64),)
# Headline cases first: the whole training step, then the branches, then the parts.
MODULE_ORDER = ("test_train_step", "test_video_branch", "test_audio_branch", "test_image_adapter",
                "test_attention", "test_frozen_encoders", "test_decoding")


def pytest_addoption(parser):
    g = parser.getgroup("fastground bench")
    g.addoption("--fg-save-cpu", action="store_true",
                help="also write bench/results/cpu-<cpu model>.json on a machine without a GPU")
    g.addoption("--fg-cpu-all", action="store_true",
                help="run every GPU case at tiny shapes on the CPU (checks the harness, times nothing useful)")
    g.addoption("--fg-cpu-compile", action="store_true",
                help="time torch.compile variants on CPU too (about a minute of cold compilation)")
    g.addoption("--fg-full", action="store_true",
                help="GPU: torch.compile at every batch size and for the training step (default: "
                     "compile at the smallest release batch only)")
    g.addoption("--fg-budget-s", type=float, default=None,
                help="skip cases that would start after this many seconds (default: none)")
    g.addoption("--fg-cpu-threads", type=int, default=1,
                help="torch intra-op threads for CPU runs (default 1: tiny shapes gain nothing from more, "
                     "and spinning thread pools collapse on a shared, oversubscribed machine)")
    g.addoption("--fg-results-dir", default=str(BENCH_DIR / "results"),
                help="where the results JSON goes (default bench/results)")


def pytest_configure(config):
    config.addinivalue_line("markers", "fg_cpu: a bench case that also runs (at tiny shapes) without a GPU")


# ---------------------------------------------------------------------------- context
class FG:
    """Session context: device, dtype, shapes, ceilings, the slice model, the records."""

    def __init__(self, config):
        self.config = config
        self.gpu = HAS_GPU
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.gpu else torch.device("cpu")
        self.dtype = torch.bfloat16 if self.gpu else torch.float32
        self.itemsize = torch.empty((), dtype=self.dtype).element_size()
        self.shapes = "release" if self.gpu else "tiny"
        self.cpu_all = config.getoption("fg_cpu_all")
        self.cpu_compile = config.getoption("fg_cpu_compile")
        self.full = config.getoption("fg_full")
        self.budget_s = config.getoption("fg_budget_s")
        self.start = time.monotonic()
        self.target_s, self.min_rounds, self.max_rounds = (0.5, 10, 50) if self.gpu else (0.3, 5, 30)
        if not self.gpu:
            torch.set_num_threads(max(1, config.getoption("fg_cpu_threads")))
        self.records: list[dict] = []
        self._ceilings = None
        self._model = None
        self._cfg = None

    # -- gating
    def require(self, cpu_ok: bool) -> None:
        if not self.gpu and not (cpu_ok or self.cpu_all):
            pytest.skip("needs a CUDA GPU (release shapes in bf16); torch sees none here")

    def require_compile(self) -> None:
        if not self.gpu and not self.cpu_compile:
            pytest.skip("torch.compile on CPU costs about a minute of cold compilation here; "
                        "pass --fg-cpu-compile to time it")

    def compile_here(self, batch: int, smallest: int) -> None:
        if self.gpu and not self.full and batch != smallest:
            pytest.skip(f"torch.compile is timed at batch {smallest} by default; --fg-full for every batch")

    def over_budget(self) -> bool:
        return self.budget_s is not None and time.monotonic() - self.start > self.budget_s

    # -- measured once
    @property
    def ceilings(self) -> harness.Ceilings:
        if self._ceilings is None:
            self._ceilings = harness.measure_ceilings(self.device)
        return self._ceilings

    # -- the model every case shares
    @property
    def cfg(self):
        if self._cfg is None:
            from fastground.config import GroundingGPTConfig
            from fastground.testing import with_token_ids
            if self.shapes == "release":
                # Every trainable branch at release width; the frozen encoders, which no
                # case runs (they start from features), at depth 1 to save memory.
                cfg = GroundingGPTConfig.from_preset("groundinggpt-7b", num_hidden_layers=2, eva_depth=1,
                                                     clip_num_layers=1, audio_num_blocks=1)
            else:
                cfg = GroundingGPTConfig.from_preset("tiny")
            self._cfg = with_token_ids(cfg)
        return self._cfg

    def model(self):
        if self._model is None:
            from fastground import GroundingGPT
            torch.manual_seed(0)
            with torch.device(self.device):
                m = GroundingGPT(self.cfg)
            # some buffers are made on the CPU whatever the default device: move everything
            self._model = m.to(device=self.device, dtype=self.dtype)
        return self._model

    def generator(self, seed: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(seed)

    def randn(self, *shape, seed: int) -> torch.Tensor:
        return torch.randn(*shape, generator=self.generator(seed), device=self.device, dtype=self.dtype)

    def record(self, fig: dict) -> None:
        self.records.append(fig)
        # Written after every case: a run killed by a device-time limit keeps what it measured.
        write_results(self, self.config, complete=False)


_FG: FG | None = None


@pytest.fixture(scope="session")
def fg(request) -> FG:
    global _FG
    if _FG is None:
        _FG = FG(request.config)
        _ = _FG.ceilings  # measured before any case allocates, on a quiet device
    return _FG


@pytest.fixture(autouse=True)
def _fg_budget(request):
    if _FG is not None and _FG.over_budget() and "benchmark" in request.fixturenames:
        pytest.skip(f"session time budget spent (--fg-budget-s={_FG.budget_s:g})")
    yield


# ---------------------------------------------------------------------------- parametrisation and order
def _tiny(config, metafunc) -> bool:
    cpu_ok = metafunc.definition.get_closest_marker("fg_cpu") is not None
    return not HAS_GPU and (cpu_ok or config.getoption("fg_cpu_all"))


def pytest_generate_tests(metafunc):
    tiny = _tiny(metafunc.config, metafunc)
    if "batch" in metafunc.fixturenames:
        metafunc.parametrize("batch", TINY_BATCHES if tiny else RELEASE_BATCHES, ids=lambda b: f"b{b}")
    if "train_case" in metafunc.fixturenames:
        metafunc.parametrize("train_case", TINY_TRAIN if tiny else RELEASE_TRAIN,
                             ids=lambda c: f"stage{c[0]}-b{c[1]}-s{c[2]}")


def pytest_collection_modifyitems(session, config, items):
    """Headline suites first (MODULE_ORDER: training step, then branches), smallest batch
    first within each, so the figures that carry the targets are measured before a time
    budget or a device-time limit can cut the run short."""
    def key(pair):
        idx, item = pair
        try:
            Path(item.path).resolve().relative_to(BENCH_DIR)
        except ValueError:
            return (0, 0, 0, idx)
        params = getattr(getattr(item, "callspec", None), "params", {})
        batch = params.get("batch") or (params.get("train_case") or (0, 0))[1]
        mod = Path(item.path).stem
        rank = MODULE_ORDER.index(mod) if mod in MODULE_ORDER else len(MODULE_ORDER)
        return (1, rank, batch, idx)
    items[:] = [it for _, it in sorted(enumerate(items), key=key)]


# ---------------------------------------------------------------------------- outcomes
_SKIPPED: list[dict] = []
_FAILED: list[str] = []


def pytest_runtest_logreport(report):
    if report.skipped and report.when in ("setup", "call"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _SKIPPED.append({"case": report.nodeid, "reason": reason.removeprefix("Skipped: ")})
    elif report.failed:
        _FAILED.append(report.nodeid)


# ---------------------------------------------------------------------------- results file
def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "generic"


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _command(config) -> str:
    """The command as typed, with this checkout's location taken out."""
    args = list(config.invocation_params.args)
    cwd = str(Path.cwd())
    args = [a.replace(cwd + os.sep, "").replace(str(REPO) + os.sep, "") for a in args]
    return "python -m pytest " + shlex.join(args)


def _versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name, mod in (("triton", "triton"), ("transformers", "transformers"), ("dali", "nvidia.dali"),
                      ("av", "av"), ("flash_attn", "flash_attn")):
        try:
            v[name] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:
            v[name] = None
    if torch.backends.cudnn.is_available():
        v["cudnn"] = torch.backends.cudnn.version()
    return v


def results_payload(fg: FG, config, complete: bool = True) -> dict:
    dev = {"kind": fg.device.type}
    if fg.gpu:
        p = torch.cuda.get_device_properties(fg.device)
        dev.update(name=p.name, sm_count=p.multi_processor_count, memory_gib=p.total_memory / harness.GIB,
                   capability=f"{p.major}.{p.minor}")
    else:
        dev.update(name=_cpu_model(), threads=torch.get_num_threads())
    commit = os.environ.get("FG_COMMIT") or _git("rev-parse", "HEAD") or "unknown"
    dirty = None if os.environ.get("FG_COMMIT") else bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "schema": 1,
        "device": dev["name"],
        "device_info": dev,
        "shapes": fg.shapes,
        "dtype": str(fg.dtype).replace("torch.", ""),
        "versions": _versions(),
        "commit": commit,
        "dirty": dirty,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": _command(config),
        "wall_s": time.monotonic() - fg.start,
        "ceilings": fg._ceilings.as_dict() if fg._ceilings else None,
        "cases": fg.records,
        "skipped": _SKIPPED,
        "failed": _FAILED,
        "complete": complete,  # False while running, or when the run was cut short
    }


_WRITTEN: list[Path] = []


def write_results(fg: FG, config, complete: bool) -> Path | None:
    """The results file of this session, replaced atomically (never half written)."""
    if not fg.records or (not fg.gpu and not config.getoption("fg_save_cpu")):
        return None
    payload = results_payload(fg, config, complete)
    name = _slug(payload["device"]) if fg.gpu else "cpu-" + _slug(payload["device"])
    out_dir = Path(config.getoption("fg_results_dir"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=float) + "\n")
    tmp.replace(path)
    return path


def pytest_sessionfinish(session, exitstatus):
    fg = _FG
    if fg is None:
        return
    path = write_results(fg, session.config, complete=True)
    if path is not None:
        _WRITTEN.append(path)


def pytest_terminal_summary(terminalreporter):
    fg = _FG
    if fg is None:
        return
    from bench import report
    tr = terminalreporter
    tr.section("fastground bench figures")
    if fg._ceilings is not None:
        c = fg._ceilings
        tr.write_line(f"device {fg.device} ({fg.shapes} shapes, {fg.dtype}); measured ceilings: copy "
                      f"{c.copy_bytes_per_s / 1e9:.1f} GB/s (read+write), matmul {c.matmul_flops_per_s / 1e12:.2f} "
                      f"TFLOP/s ({c.matmul_dtype}, n={c.matmul_n})")
    if fg.records:
        for line in report.text_table(fg.records):
            tr.write_line(line)
    else:
        tr.write_line("no case ran")
    for line in report.target_lines({"cases": fg.records, "skipped": _SKIPPED, "shapes": fg.shapes,
                                          "device_info": {"kind": fg.device.type}}):
        tr.write_line(line)
    for p in _WRITTEN:
        tr.write_line(f"results written to {os.path.relpath(p)}")
    if not _WRITTEN and fg.records and not fg.gpu:
        tr.write_line("CPU run: no results file written (pass --fg-save-cpu to write one)")
