"""Where reshard's cold start goes, phase by phase, in one rank; for profiling ``coldstart.py``'s reshard side.

    torchrun --nproc-per-node N benchmarks/coldstart_phases.py ARTIFACT [--out OUT.json] [--prefetch HOW]

Runs what ``coldstart_worker.py reshard`` runs, with the loader's steps wrapped in timers (monkeypatched module
attributes, so the code path and order are unchanged; on entering ``_build_model`` its transformers imports are
timed as one phase by importing exactly what it imports). ``--prefetch`` prototypes a fix: read the rank file
in a background thread while transformers is imported (see ``_read_ahead``). Then two forwards: the
first pays the page faults of the mapped weights, the second is compute only. Rank 0 prints a table (seconds, and
the heavy modules each phase imported); every rank writes its numbers to ``OUT.json.rankR`` with ``--out``.
"""

import time  # first statement: nothing is imported before the clock is read

_FIRST_LINE = time.clock_gettime(time.CLOCK_BOOTTIME)

import argparse  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable  # noqa: E402
from typing import Any  # noqa: E402

HEAVY = ("sympy", "scipy", "torch._dynamo", "torch._inductor", "torch.export", "transformers.loss", "torch._prims")
PROMPT = [[1, 5, 77, 900, 1000, 3, 42, 500]]


def _now() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def _process_start() -> float:
    with open("/proc/self/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[19]) / os.sysconf("SC_CLK_TCK")


class Phases:
    """Accumulated seconds, minor faults and newly imported heavy modules per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.faults: dict[str, int] = {}
        self.imported: dict[str, list[str]] = {}

    def add(self, name: str, seconds: float, faults: int, before: set[str]) -> None:
        """Record one timed call of ``name``."""
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.faults[name] = self.faults.get(name, 0) + faults
        new = {m for m in sys.modules.keys() - before if m in HEAVY}
        self.imported[name] = sorted(set(self.imported.get(name, [])) | new)

    def run(self, name: str, thunk: Callable[[], Any]) -> Any:
        """Call ``thunk`` as phase ``name``."""
        before, faults, started = set(sys.modules), _minflt(), _now()
        try:
            return thunk()
        finally:
            self.add(name, _now() - started, _minflt() - faults, before)

    def wrap(self, owner: Any, attr: str, name: str) -> None:
        """Replace ``owner.attr`` (a function or classmethod) with a timed version."""
        raw = owner.__dict__.get(attr) if isinstance(owner, type) else None
        is_classmethod = isinstance(raw, classmethod)
        original = raw.__func__ if isinstance(raw, classmethod) else getattr(owner, attr)

        @functools.wraps(original)
        def timed(*args: Any, **kwargs: Any) -> Any:
            return self.run(name, lambda: original(*args, **kwargs))

        setattr(owner, attr, classmethod(timed) if is_classmethod else timed)


def _minflt() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _read_ahead(rank_share: Any, how: str) -> None:
    """Prototype of a loader fix: have the rank file read in a background thread while transformers is imported.

    ``willneed``: ``posix_fadvise(POSIX_FADV_WILLNEED)`` on the file. ``populate``: ``madvise(MADV_POPULATE_READ)``
    on the mapping (Linux 5.14+), which also fills the page tables so the first forward takes no page faults.
    """
    import ctypes
    import threading

    from reshard.manifests import resolve_in

    original = rank_share.open_rank_file
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def willneed(path: Any) -> None:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(descriptor)

    def populate(address: int, size: int) -> None:
        start = address - address % os.sysconf("SC_PAGE_SIZE")
        if libc.madvise(start, size + address - start, 22) != 0:  # MADV_POPULATE_READ
            print(f"madvise: errno {ctypes.get_errno()}", file=sys.stderr)

    def mapped_and_read_ahead(root: Any, manifest: Any, rank: int, **kwargs: Any) -> Any:
        if how == "willneed":
            threading.Thread(target=willneed, args=(resolve_in(root, manifest.rank_file(rank).path),)).start()
        opened = original(root, manifest, rank, **kwargs)
        tensors = opened.tensors
        if how == "populate" and tensors:
            storage = next(iter(tensors.values())).untyped_storage()  # every view shares the file's mapping
            threading.Thread(target=populate, args=(storage.data_ptr(), storage.nbytes()), daemon=True).start()
        return opened

    rank_share.open_rank_file = mapped_and_read_ahead


def main() -> None:
    start = _process_start()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--out", help="write each rank's numbers to OUT.rankR")
    parser.add_argument("--prefetch", choices=["none", "willneed", "populate"], default="none", help="prototype fix")
    args = parser.parse_args()
    phases = Phases()
    phases.seconds["interpreter start-up"] = _FIRST_LINE - start
    phases.run("import torch", lambda: __import__("torch"))
    phases.run("import torch.distributed.tensor", lambda: __import__("torch.distributed.tensor"))
    phases.run("import reshard.loaders (rest)", lambda: __import__("reshard.loaders"))
    import torch
    import torch.distributed as dist

    import reshard.loaders.consensus as consensus
    import reshard.loaders.model as model_module
    import reshard.loaders.rank_share as rank_share
    import reshard.loaders.state_dict as state_dict

    def transformers_imports() -> None:  # exactly _build_model's and _assign's imports
        import transformers.core_model_loading
        import transformers.distributed
        import transformers.distributed.tensor_parallel
        import transformers.modeling_utils
        import transformers.monkey_patching
        import transformers.utils.generic
        import transformers.utils.loading_report

        transformers.AutoModelForCausalLM._model_mapping  # noqa: B018 (resolves the lazy attribute)

    build_model = model_module._build_model

    def timed_build(*args: Any, **kwargs: Any) -> Any:  # its imports as one phase, then its steps wrapped
        phases.run("import transformers (in _build_model)", transformers_imports)
        import transformers
        import transformers.distributed.tensor_parallel as tensor_parallel
        from transformers import GenerationMixin, PreTrainedModel

        for owner, attr, name in (
            (transformers.AutoConfig, "from_pretrained", "AutoConfig.from_pretrained"),
            (tensor_parallel, "apply_tensor_parallelism", "apply_tensor_parallelism"),
            (model_module, "_assign", "assign mapped tensors"),
            (PreTrainedModel, "_finalize_model_loading", "_finalize_model_loading"),
            (GenerationMixin, "adjust_generation_fn", "adjust_generation_fn"),
        ):
            phases.wrap(owner, attr, name)
        return build_model(*args, **kwargs)

    model_module._build_model = timed_build
    for owner, attr, name in (
        (state_dict, "resolve_mesh", "init process group + device mesh"),
        (rank_share, "read_manifest", "read manifest"),
        (state_dict, "check_mesh", "check mesh"),
        (state_dict, "check_dtype", "check dtype"),
        (rank_share, "open_rank_file", "map rank file (header check + mmap)"),
        (state_dict, "to_global", "DTensor.from_local (all tensors)"),
        (consensus, "_gather", "consensus all-gathers (agreed)"),
    ):
        phases.wrap(owner, attr, name)
    if args.prefetch != "none":
        _read_ahead(rank_share, args.prefetch)
    marks = {"imports done": _now() - start}
    model = phases.run("load_model (total)", lambda: model_module.load_model(args.artifact))
    marks["model ready"] = _now() - start
    prompt = torch.tensor(PROMPT)
    with torch.no_grad():
        phases.run("first forward", lambda: model(prompt).logits)
        marks["first logits"] = _now() - start
        phases.run("second forward", lambda: model(prompt).logits)
    rank = dist.get_rank()
    accounted = sum(v for k, v in phases.seconds.items() if k not in ("load_model (total)",) and "forward" not in k)
    rows = [
        (name, phases.seconds[name], phases.faults.get(name, 0), phases.imported.get(name, []))
        for name in phases.seconds
    ]
    if rank == 0:
        print(f"| phase (rank 0, world {dist.get_world_size()}) | s | minor faults | heavy modules imported |")
        print("|---|---:|---:|---|")
        for name, seconds, faults, imported in rows:
            print(f"| {name} | {seconds:.3f} | {faults} | {', '.join(imported)} |")
        print(f"| (sum of phases before first forward, excl. load_model total) | {accounted:.3f} | | |")
        print(" ; ".join(f"{k} at {v:.2f}s" for k, v in marks.items()))
    if args.out:
        with open(f"{args.out}.rank{rank}", "w") as handle:
            json.dump({"phases": phases.seconds, "faults": phases.faults, "marks": marks}, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
