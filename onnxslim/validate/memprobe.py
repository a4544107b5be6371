"""Child process for :mod:`onnxslim.validate.bench`: the peak memory one model's session adds.

Invoked as ``python -m onnxslim.validate.memprobe '<json request>'``; prints one JSON line with
``peak_growth_mb`` = (peak resident set size after creating the session and running it ``runs``
times) minus (resident set size just before creating it), and ``method``.

On Linux the kernel's high-water mark is reset first (``echo 5 > /proc/self/clear_refs``), so the peak
is VmHWM of /proc/self/status measured from the baseline on; elsewhere ``getrusage().ru_maxrss`` is
used, which cannot be reset and so can under-report when the interpreter's start-up peak was higher.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def proc_status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def reset_high_water_mark() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def ru_maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def main(argv: list[str]) -> None:
    request = json.loads(argv[0])
    import onnxruntime as ort

    from onnxslim.validate.runtime import SessionOptions, TensorSpec, make_session_options, random_feeds

    options = SessionOptions(threads=request["threads"], opt_level=request["opt_level"],
                             providers=tuple(request["providers"]))
    so = make_session_options(options)
    # the inputs exist before the baseline is taken, so they are not counted
    specs = [TensorSpec(name, dtype, tuple(shape)) for name, dtype, shape in request["inputs"]]
    feeds = random_feeds(specs, request["shapes"], seed=request["seed"])

    use_proc = proc_status_kib("VmRSS") is not None and reset_high_water_mark()
    before = proc_status_kib("VmRSS") * 1024 if use_proc else ru_maxrss_bytes()
    session = ort.InferenceSession(request["model"], sess_options=so, providers=list(options.providers))
    for _ in range(request["runs"]):
        session.run(None, feeds)
    after = proc_status_kib("VmHWM") * 1024 if use_proc else ru_maxrss_bytes()
    method = "VmHWM (reset) - VmRSS" if use_proc else "ru_maxrss growth"
    print(json.dumps({"peak_growth_mb": max(after - before, 0) / 2**20, "before_mb": before / 2**20,
                      "after_mb": after / 2**20, "method": method}))


if __name__ == "__main__":
    main(sys.argv[1:])
