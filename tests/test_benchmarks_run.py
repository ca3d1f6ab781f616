"""The benchmark suites run (tiny cases, timing disabled) and their correctness checks pass."""
import json
import os
import subprocess
import sys
from pathlib import Path

import kdops

ROOT = Path(__file__).resolve().parents[1]


def run_suite(name, **env):
    """pytest's output for benchmarks/`name` with timing disabled; fails the test if it fails."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--benchmark-disable",
         str(ROOT / "benchmarks" / name)],
        cwd=ROOT, env=dict(os.environ, **env), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_kd_loss_benchmarks_run():
    out = run_suite("bench_kd_loss.py", KDOPS_BENCH_SHAPES="16x33,3x7",
                    KDOPS_BENCH_DIVERGENCES="kl,jsd")
    cases_per_shape = 18 if kdops.backend_info()["kd_forward"]["cpu"] == "native" else 14
    assert f"{2 * 2 * cases_per_shape} passed" in out


def test_pilot_sgd_benchmarks_run():
    out = run_suite("bench_pilot_sgd.py", KDOPS_BENCH_LISTS="tiny,resnet20")
    cases_per_list = 8 if kdops.backend_info()["pilot_sgd_step"]["cpu"] == "native" else 6
    assert f"{2 * cases_per_list} passed" in out


def test_meta_step_benchmarks_run():
    out = run_suite("bench_meta_step.py", KDOPS_BENCH_META="digits_mlp")
    assert "4 passed" in out


def test_pilot_loss_grad_benchmarks_run():
    out = run_suite("bench_pilot_loss_grad.py")
    assert "2 passed" in out


def test_compat_benchmarks_run():
    out = run_suite("bench_compat.py", KDOPS_BENCH_COMPAT_SHAPES="8x10,2x4x33")
    assert "8 passed" in out


def test_gpu_kd_loss_benchmarks_run_interpreted():
    """The GPU suite on tiny shapes, its Triton kernels through the interpreter (no liger
    here): forward 3 cases, forward+backward 4, second order 2, per dtype and divergence."""
    out = run_suite("bench_kd_loss_gpu.py", TRITON_INTERPRET="1", KDOPS_BENCH_DEVICE="cpu",
                    KDOPS_BENCH_SHAPES="16x33", KDOPS_BENCH_DTYPES="float32,bfloat16",
                    KDOPS_BENCH_DIVERGENCES="kl,jsd")
    assert "36 passed" in out


def test_student_jvp_benchmarks_run():
    out = run_suite("bench_student_jvp.py", KDOPS_BENCH_JVP_BATCH="4")
    assert "6 passed" in out


def run_script(name, *args):
    """The JSON that benchmarks/`name` writes when run with `args`; fails if the script does."""
    out = ROOT / "build" / f"{name}.json"
    out.parent.mkdir(exist_ok=True)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args, "--json",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


def test_floor_scripts_run():
    meta = run_script("meta_step_floor.py", "digits_mlp", "--rounds", "2")
    parts = ("teacher", "teacher_new", "student", "quiz")
    assert set(meta["medians_ms"]) == {"plain", "kdops_jvp", "floor", *parts}
    assert all(meta["medians_ms"][k] > 0 for k in parts)
    assert "student_jvp" in meta["phase_ms"]["kdops_jvp"]
    assert "meta_gradient" in meta["phase_ms"]["plain"]
    pilot = run_script("pilot_autograd_floor.py", "--rounds", "2")
    assert set(pilot["medians_us"]) == {"make_grads"} | {
        f"{impl}/{how}" for impl in ("kdops", "loop", "nothing_python_function",
                                     "nothing_cpp_node")
        for how in ("forward_backward", "forward_backward_calling_thread")}


def test_profile_script_runs():
    """Every phase of both steps is profiled, and the operators it counts are there."""
    out = run_script("profile_meta_step.py", "digits_mlp", "--steps", "2")
    phases = {"pilot", "quiz", "meta_gradient", "teacher_update", "real_step"}
    for impl, extra in (("plain", set()), ("kdops_jvp", {"student_jvp"})):
        assert set(out["results"][impl]["phases"]) == phases | extra
        assert all(row["ops"] > 0 and row["wall_ms"] > 0
                   for row in out["results"][impl]["phases"].values())
    # the demo's MLPs, 3 layers in the teacher and 2 in the student: the pilot's forwards of
    # both, the quiz's of the student, the real step's of both
    assert out["results"]["plain"]["operators"]["aten::linear"]["count"] == 3 + 2 + 2 + 3 + 2
