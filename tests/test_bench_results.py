"""The bench keeps every finished case when its process dies mid-run (a device call that runs
out of time is killed, not asked to finish): the results file is rewritten after each case.
Checked on CPU with a bench run that is killed right after its first case."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

KILLER = '''
import os

def pytest_runtest_logreport(report):
    if report.when == "call" and report.passed:
        os._exit(9)  # as a device-time limit would: no teardown, no session finish
'''


@pytest.mark.slow
def test_killed_bench_run_keeps_its_finished_cases(tmp_path):
    (tmp_path / "fg_killer.py").write_text(KILLER)
    out = tmp_path / "results"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "bench/test_video_branch.py", "--benchmark-only", "-q", "-p", "fg_killer",
         "--fg-save-cpu", "--fg-results-dir", str(out), "-k", "eager", "-p", "no:cacheprovider"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 9, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = list(out.glob("cpu-*.json"))
    assert len(files) == 1, (files, proc.stdout[-2000:])
    payload = json.loads(files[0].read_text())
    assert payload["complete"] is False
    assert len(payload["cases"]) == 1
    case = payload["cases"][0]
    assert case["bench"] == "video_branch" and case["variant"] == "eager" and case["time_ms"] > 0
    assert not list(out.glob("*.tmp"))


def test_headline_suites_run_first():
    from bench.conftest import MODULE_ORDER
    assert MODULE_ORDER[:3] == ("test_train_step", "test_video_branch", "test_audio_branch")
