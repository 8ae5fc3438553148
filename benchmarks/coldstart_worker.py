"""One rank of a ``benchmarks/coldstart.py`` measurement, launched by torchrun; not meant to be run by hand.

    torchrun --nproc-per-node N benchmarks/coldstart_worker.py {reshard,transformers} PATH OUT

``reshard``: ``from reshard.loaders import load_model`` then ``load_model(PATH)`` (a tp artifact). ``transformers``:
``from transformers import AutoModelForCausalLM`` then ``from_pretrained(PATH, tp_plan="auto")``. Each library
initialises the process group itself. Then one forward of an 8-token prompt under ``torch.no_grad()``.

Times are seconds since this process started (``/proc/self/stat`` starttime, CLOCK_BOOTTIME, 10 ms ticks), so the
interpreter's own start-up and every import are counted. Writes ``OUT/{side}.rank{R}.json`` (times, peak RSS) and
``OUT/{side}.rank{R}.pt`` (the logits).
"""

import time  # first statement: nothing is imported before the clock is read

_FIRST_LINE = time.clock_gettime(time.CLOCK_BOOTTIME)

import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from typing import Any  # noqa: E402

PROMPT = [[1, 5, 77, 900, 1000, 3, 42, 500]]


def _process_start() -> float:
    """This process's start (fork) time on CLOCK_BOOTTIME, in seconds, from ``/proc/self/stat``."""
    with open("/proc/self/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 (starttime); fields[0] is field 3


def _cpu() -> float:
    """User + system CPU seconds of this process so far (wall time minus waiting, whatever the machine's load)."""
    times = os.times()
    return times.user + times.system


def _status_mb(*keys: str) -> dict[str, float]:
    """Selected ``/proc/self/status`` memory lines (kB) in MB (10**6 bytes)."""
    found: dict[str, float] = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in keys:
                found[key] = int(value.split()[0]) * 1024 / 1e6
    return found


def main() -> None:
    start = _process_start()
    since = lambda: time.clock_gettime(time.CLOCK_BOOTTIME) - start  # noqa: E731
    side, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    marks: dict[str, Any] = {"first_line": _FIRST_LINE - start}
    if side == "reshard":
        from reshard.loaders import load_model

        marks["imported"] = since()
        model = load_model(path)
    elif side == "transformers":
        from transformers import AutoModelForCausalLM

        marks["imported"] = since()
        model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    else:
        raise SystemExit(f"unknown side {side!r}")
    marks["ready"] = since()
    marks["ready_cpu"] = _cpu()
    import torch
    import torch.distributed as dist

    with torch.no_grad():
        logits = model(torch.tensor(PROMPT)).logits
    marks["logits"] = since()
    marks["logits_cpu"] = _cpu()
    usage = resource.getrusage(resource.RUSAGE_SELF)
    marks["peak_rss_mb"] = usage.ru_maxrss * 1024 / 1e6  # kB on Linux; counts touched pages of mapped files too
    marks["major_faults"] = usage.ru_majflt
    marks["status_mb"] = _status_mb("VmHWM", "RssAnon", "RssFile")
    marks["dtype"] = str(next(model.parameters()).dtype)
    marks["transformers_imported"] = "transformers" in sys.modules
    rank = dist.get_rank() if dist.is_initialized() else 0
    from safetensors.torch import save_file  # logits travel as safetensors, never pickle

    save_file({"logits": logits.detach().contiguous()}, os.path.join(out, f"{side}.rank{rank}.safetensors"))
    with open(os.path.join(out, f"{side}.rank{rank}.json"), "w") as handle:
        json.dump(marks, handle)
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
