#!/usr/bin/env bash
# Everything kdops checks on a GPU machine, in stages, for one call of a lent device:
#
#   OUT=/tmp/kdops-gpu KDOPS_GIT_SHA=$(git rev-parse HEAD) \
#       bash benchmarks/gpu_session.sh build gpu_tests sanitize bench_kd bench_pilot bench_meta \
#       bench_jvp bench_pilot_loss bench_compat floor_meta profile_meta graphed_meta
#
# build        compiles kdops._C with the CUDA kernels for sm_90 in place and copies it,
#              stripped, to $OUT (to carry next time: skipped when a build is already there)
# gpu_tests    the GPU tests: Triton kernels against float64 (the loss, the pilot's gradient
#              of it, forward-mode tangents), 64-bit offsets, no host sync, the CUDA pilot kernels bit for bit against
#              the CPU ones, one launch per direction,
#              the tangent replay of kdops.meta on CUDA networks (cuDNN batch norm and RNNs), the
#              meta steps, the kdops.compat adapters on CUDA logits
# sanitize     compute-sanitizer memcheck over one run of each kernel (tests/sanitize_kernels.py)
# bench_kd     benchmarks/bench_kd_loss_gpu.py (KDOPS_BENCH_SHAPES / _DTYPES pick a subset,
#              KDOPS_BENCH_K a pytest -k expression, KDOPS_BENCH_TAG a suffix of its JSON)
# bench_pilot  benchmarks/bench_pilot_sgd.py on the GPU
# bench_meta   benchmarks/bench_meta_step.py on the GPU
# bench_jvp    benchmarks/bench_student_jvp.py on the GPU
# bench_pilot_loss  benchmarks/bench_pilot_loss_grad.py on the GPU
# bench_compat benchmarks/bench_compat.py on the GPU (KDOPS_BENCH_COMPAT_SHAPES picks the shapes)
# floor_meta   benchmarks/meta_step_floor.py cifar, 40 rounds: plain, kdops "jvp" and the floor
# profile_meta benchmarks/profile_meta_step.py cifar: host and device time per phase
# graphed_meta benchmarks/meta_step_graphed.py: eager steps and CUDA-graph replays, 60 rounds
#
# Every stage's output goes to $OUT/session.log, pytest-benchmark JSON to $OUT/<gpu>-*.json
# with the git sha in its commit_info (the device copy of the tree has no .git). Liger-Kernel
# is used when a wheel is carried in .whl/. A failing stage is reported and the next one
# still runs; the exit status is the number of failed stages.
set -uo pipefail
OUT=${OUT:?set OUT to the folder for logs and results}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 KDOPS_BENCH_DEVICE=cuda
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
        export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
# "h100" for "NVIDIA H100 80GB HBM3": the prefix of the result files
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | awk '{print tolower($2)}')
failed=0
summary=()

stamp() {  # the git sha into a pytest-benchmark JSON's commit_info
    python3 - "$1" <<'PY'
import json, os, sys
path = sys.argv[1]
data = json.load(open(path))
data["commit_info"] = {"id": os.environ.get("KDOPS_GIT_SHA", "unknown"), "project": "kdops"}
json.dump(data, open(path, "w"), indent=1)
PY
}

build() {
    if ! compgen -G "kdops/_C.cpython-312*.so" > /dev/null; then
        TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 setup.py -q build_ext --inplace || return 1
        strip --strip-debug -o "$OUT/$(basename kdops/_C.cpython-312*.so)" kdops/_C.cpython-312*.so
    fi
    python3 -c "import kdops, json; print(json.dumps(kdops.backend_info()))"
}

gpu_tests() {
    python3 -m pytest -q -n 8 tests/test_triton.py tests/test_pilot.py tests/test_tangent.py \
        tests/test_recurrent_tangent.py tests/test_meta.py tests/test_compat.py \
        tests/test_student_grad.py tests/test_forward_mode.py \
        --junitxml="$OUT/gpu-tests.xml"
}

sanitize() {
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 1 \
        python3 tests/sanitize_kernels.py
}

bench() {  # bench <suite> <json name>
    python3 -m pytest -q "benchmarks/$1" -k "${KDOPS_BENCH_K:-}" --benchmark-json="$OUT/$2" \
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name
    local status=$?
    [ -f "$OUT/$2" ] && stamp "$OUT/$2"
    return $status
}

bench_kd() { bench bench_kd_loss_gpu.py "$GPU-kd_loss${KDOPS_BENCH_TAG:-}.json"; }
bench_pilot() { bench bench_pilot_sgd.py "$GPU-pilot_sgd.json"; }
bench_meta() { bench bench_meta_step.py "$GPU-meta_step.json"; }
bench_jvp() { bench bench_student_jvp.py "$GPU-student_jvp.json"; }
bench_pilot_loss() { bench bench_pilot_loss_grad.py "$GPU-pilot_loss_grad.json"; }
bench_compat() { bench bench_compat.py "$GPU-compat.json"; }
floor_meta() {
    python3 benchmarks/meta_step_floor.py cifar --rounds 40 --json "$OUT/$GPU-meta_step-floor-cifar.json"
}
profile_meta() {
    python3 benchmarks/profile_meta_step.py cifar --json "$OUT/$GPU-meta_step-profile-cifar.json"
}
graphed_meta() {
    python3 benchmarks/meta_step_graphed.py --rounds 60 --json "$OUT/$GPU-meta_step-graphed.json"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
    python3 -c "import sys, torch, triton; print(sys.version.split()[0], torch.__version__, triton.__version__)"
} 2>&1 | tee -a "$OUT/session.log"
for stage in "$@"; do
    start=$SECONDS
    echo "=== $stage" >> "$OUT/session.log"
    "$stage" 2>&1 | tee -a "$OUT/session.log"
    status=${PIPESTATUS[0]}
    [ "$status" -ne 0 ] && failed=$((failed + 1))
    summary+=("$(printf '%-12s exit %-3s %5ss' "$stage" "$status" $((SECONDS - start)))")
done
printf '%s\n' "${summary[@]}" | tee -a "$OUT/session.log"
exit "$failed"
