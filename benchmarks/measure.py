"""What the benchmark suites share: the device they run on, and memory measurement."""
import ctypes
import ctypes.util
import os
import re
import subprocess
import sys
import time

import torch

# KDOPS_BENCH_DEVICE=cuda runs the pilot-step and meta-step suites on a GPU.
DEVICE = torch.device(os.environ.get("KDOPS_BENCH_DEVICE", "cpu"))
DEVICE_NAME = torch.cuda.get_device_name(DEVICE) if DEVICE.type == "cuda" else "cpu"


def synchronize():
    """Waits for DEVICE's queued work (a no-op on the CPU), so host clocks time it."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def git_sha():
    """The commit measured: $KDOPS_GIT_SHA (set where the tree is a copy without .git, as on
    the GPU machines), else `git rev-parse --short HEAD` with "-dirty" for uncommitted changes
    to tracked files, else "unknown"."""
    if os.environ.get("KDOPS_GIT_SHA"):
        return os.environ["KDOPS_GIT_SHA"]
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, check=True,
                             capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=here, check=True, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("-dirty" if dirty.strip() else "")


def peak_extra(run, args, unit_bytes, device=torch.device("cpu")):
    """Peak memory of ``run(*args)`` beyond what was live before it, in units of `unit_bytes`:
    on a CUDA device the caching allocator's peak; on the CPU peak RSS, its high-water mark
    reset first (Linux; None elsewhere). On the CPU the C allocator first hands its free
    memory back to the system (glibc's malloc_trim): memory that earlier work freed but the
    process kept would otherwise be reused without raising the RSS, and a run measured after
    a bigger one would read as needing almost nothing."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run(*args)
        torch.cuda.synchronize(device)
        return round((torch.cuda.max_memory_allocated(device) - base) / unit_bytes, 2)
    if not sys.platform.startswith("linux"):
        return None

    def rss(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\s+(\d+) kB", text).group(1)) * 1024

    _release_free_memory()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS")
    run(*args)
    return round((rss("VmHWM") - base) / unit_bytes, 2)


def _release_free_memory():
    """glibc's malloc_trim(0), where the C library has it."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def copy_bandwidth():
    """Bytes per second of a device-to-device copy (read plus written), median of 10 after a
    warm-up: the yardstick of the bandwidth fractions reported. 256 MiB of float32 on the CPU;
    1 GiB on a GPU, where a 256 MiB copy (about 0.2 ms on an H100) is short enough for the
    host clock's synchronization to read 2.7-2.8 TB/s of the 3.0 TB/s a long copy moves."""
    numel = 2 ** 28 if DEVICE.type == "cuda" else 2 ** 26
    src = torch.randn(numel, device=DEVICE)
    dst = torch.empty_like(src)
    times = []
    for _ in range(11):
        synchronize()
        start = time.perf_counter()
        dst.copy_(src)
        synchronize()
        times.append(time.perf_counter() - start)
    return 2 * src.nbytes / sorted(times[1:])[5]


def kernel_time(run, args, reps=5):
    """(seconds, launches): the summed duration of the GPU kernels one ``run(*args)`` launches
    and their number, averaged over `reps` runs under the profiler (CUPTI's timestamps). The
    device's share of a call, without the host's: on a GPU, a host clock around a call that
    synchronizes also counts the Python and allocation work before the first launch."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    run(*args)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            run(*args)
    kernels = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    seconds = sum(e.self_device_time_total for e in kernels) * 1e-6 / reps
    return seconds, sum(e.count for e in kernels) / reps
