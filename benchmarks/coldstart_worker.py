"""One rank of a ``benchmarks/coldstart.py`` measurement, launched by torchrun; not meant to be run by hand.

    torchrun --nproc-per-node N benchmarks/coldstart_worker.py SIDE PATH OUT [server|process]

SIDE ``reshard`` or ``reshard_regrid``: ``from reshard.loaders import load_model`` then ``load_model(PATH)`` (a tp
artifact). ``transformers`` or ``transformers_dcp``: ``from transformers import AutoModelForCausalLM,
DistributedConfig`` then ``from_pretrained(PATH, distributed_config=DistributedConfig(tp_size=WORLD_SIZE))`` (a
checkpoint; for ``transformers_dcp`` a distributed checkpoint saved by ``save_pretrained(...,
distributed_checkpoint=True)``, which transformers detects and reads with torch DCP). Each library initialises
the process group itself. Then two forwards of an 8-token prompt under ``torch.no_grad()``: the first pays for
whatever the load left undone (page faults of weights not yet resident), the second is compute only.

``server`` (default): torch, ``torch.distributed.tensor``, transformers, the model's modeling module (and for
reshard ``reshard.loaders.model``, for ``transformers_dcp`` ``torch.distributed.checkpoint``'s state-dict and planner
modules) are imported before the load is timed, as in a server that loads a model into
a running process; ``process``: nothing is, so the imports count in the load. Either way the times since this
process started (``/proc/self/stat`` starttime, CLOCK_BOOTTIME, 10 ms ticks) are recorded too. Writes
``OUT/{side}.rank{R}.json`` (times, peak RSS, faults) and ``OUT/{side}.rank{R}.safetensors`` (the logits).
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


def _server_imports(side: str, path: str) -> None:
    """What a server has imported before it loads a model: torch, DTensor, transformers, the modeling module."""
    import importlib

    import torch.distributed.tensor  # noqa: F401
    import transformers
    from transformers import AutoModelForCausalLM, DistributedConfig  # noqa: F401

    config = transformers.AutoConfig.from_pretrained(path)
    importlib.import_module(AutoModelForCausalLM._model_mapping[type(config)].__module__)
    if side.startswith("reshard"):
        import reshard.loaders.model  # noqa: F401
    if side == "transformers_dcp":  # what transformers imports lazily to load one (hf_storage it imports anyway)
        importlib.import_module("torch.distributed.checkpoint.default_planner")
        importlib.import_module("torch.distributed.checkpoint.state_dict")


def main() -> None:
    start = _process_start()
    since = lambda: time.clock_gettime(time.CLOCK_BOOTTIME) - start  # noqa: E731
    side, path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else "server"
    marks: dict[str, Any] = {"first_line": _FIRST_LINE - start}
    if mode == "server":
        _server_imports(side, path)
    marks["imported"] = since()
    began, faults = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    if side.startswith("reshard"):  # reshard, or reshard_regrid (an artifact of another tp)
        from reshard.loaders import load_model

        model = load_model(path)
    elif side in ("transformers", "transformers_dcp"):
        from transformers import AutoModelForCausalLM, DistributedConfig

        tp = DistributedConfig(tp_size=int(os.environ["WORLD_SIZE"]))  # the model's own ("auto") plan
        model = AutoModelForCausalLM.from_pretrained(path, distributed_config=tp)
    else:
        raise SystemExit(f"unknown side {side!r}")
    marks["load"] = time.perf_counter() - began
    marks["ready"] = since()
    marks["ready_cpu"] = _cpu()
    import torch
    import torch.distributed as dist

    prompt = torch.tensor(PROMPT)
    before = resource.getrusage(resource.RUSAGE_SELF)
    with torch.no_grad():
        logits = model(prompt).logits
        marks["first_forward"] = time.perf_counter() - began - marks["load"]
        marks["logits"] = since()
        marks["logits_cpu"] = _cpu()
        after = resource.getrusage(resource.RUSAGE_SELF)
        again = time.perf_counter()
        model(prompt)
        marks["second_forward"] = time.perf_counter() - again
    marks["first_logits"] = marks["load"] + marks["first_forward"]
    marks["resident"] = marks["first_logits"] - marks["second_forward"]  # load + what the first forward adds
    marks["load_faults"] = before.ru_minflt + before.ru_majflt - faults.ru_minflt - faults.ru_majflt
    marks["forward_faults"] = after.ru_minflt + after.ru_majflt - before.ru_minflt - before.ru_majflt
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
    # skip interpreter finalization: gloo's worker thread can abort it (pytorch/pytorch#190489), see the README
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
