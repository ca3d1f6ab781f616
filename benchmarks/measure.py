"""Memory measurement shared by the benchmark suites."""
import re
import sys


def peak_extra(run, args, unit_bytes):
    """Peak memory of ``run(*args)`` beyond what was live before it, in units of `unit_bytes`
    (Linux: peak RSS, its high-water mark reset first; None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None

    def rss(key):
        text = open("/proc/self/status").read()
        return int(re.search(key + r":\s+(\d+) kB", text).group(1)) * 1024

    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = rss("VmRSS")
    run(*args)
    return round((rss("VmHWM") - base) / unit_bytes, 2)
