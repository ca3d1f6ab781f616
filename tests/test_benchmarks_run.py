"""The benchmark suite runs (tiny shapes, timing disabled) and its correctness checks pass."""
import os
import subprocess
import sys
from pathlib import Path

import kdops

ROOT = Path(__file__).resolve().parents[1]


def test_kd_loss_benchmarks_run():
    env = dict(os.environ, KDOPS_BENCH_SHAPES="16x33,3x7")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         str(ROOT / "benchmarks" / "bench_kd_loss.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases_per_shape = 14 if kdops.backend_info()["kd_forward"]["cpu"] == "native" else 11
    assert f"{2 * cases_per_shape} passed" in proc.stdout


def test_pilot_sgd_benchmarks_run():
    env = dict(os.environ, KDOPS_BENCH_LISTS="tiny,resnet20")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         str(ROOT / "benchmarks" / "bench_pilot_sgd.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    cases_per_list = 8 if kdops.backend_info()["pilot_sgd_step"]["cpu"] == "native" else 6
    assert f"{2 * cases_per_list} passed" in proc.stdout


def test_meta_step_benchmarks_run():
    env = dict(os.environ, KDOPS_BENCH_META="digits_mlp")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         str(ROOT / "benchmarks" / "bench_meta_step.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "3 passed" in proc.stdout
