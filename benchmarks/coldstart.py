"""Cold start per rank: reshard's ``load_model`` on a tp artifact vs transformers' TP ``from_pretrained``.

Models (``--model``), random bf16 weights made by ``make_checkpoint.py`` if missing, each laid out like its Hub repo:
``dense`` (default) SmolLM2-1.7B's shapes, 24 layers, 3.42 GB in 4 files; ``moe`` Qwen3-30B-A3B's shapes with 2 of its
48 layers, 3.74 GB in 4 files with per-expert keys (``--experts`` fewer experts for a smoke run). The reshard tp N
artifact is converted beside the checkpoint (``NAME-tpN``) if missing.

Sides, each a fresh ``torchrun --standalone --nproc-per-node N`` launch of ``coldstart_worker.py`` (N = world size =
tp; each library initialises the gloo process group itself; ``OMP_NUM_THREADS=--threads``,
``TRANSFORMERS_VERBOSITY=error``):

- ``reshard``: ``load_model(NAME-tpN)``;
- ``transformers``: ``from_pretrained(NAME, distributed_config=DistributedConfig(tp_size=N))``;
- ``transformers_dcp`` (``--dcp``): the same call on transformers' own distributed checkpoint, the output of
  ``save_pretrained(dir, distributed_checkpoint=True)`` of the TP model at world N, made once by
  ``dcp_save_worker.py`` under torchrun and cached beside the checkpoint (``NAME-dcp-tpN``);
- ``reshard_regrid`` (``--regrid``): ``load_model`` of the tp 2N artifact on N ranks (each rank cuts its slices out of
  two old rank files).

Each rank measures with ``perf_counter``, in server-like mode (``--mode server``, the default: torch,
``torch.distributed.tensor``, transformers and the model's modeling module are imported before the clock starts, plus
reshard's loader for reshard and ``torch.distributed.checkpoint``'s modules for ``transformers_dcp``): **load** (the
call until the model is returned), **first forward** and **second forward** (8 tokens under ``no_grad``), **first
logits** = load + first forward, **resident** = first logits - second forward (what the load left for the first
forward, page faults included, is counted), and its **peak RSS** (``ru_maxrss``: anonymous memory plus the touched
pages of mapped files). From the process start (``/proc/self/stat``, 10 ms ticks; interpreter and every import
count): **ready** and **logits** (whole process). ``--mode process`` imports nothing before the clock. A launch's value
is the max over its ranks.

Per world size and cache state: one untimed launch per side first when warm; then ``--repeat`` rounds, one launch per
side each (the order alternating), so a launch's neighbours share the machine's load. Cold (unless ``--skip-cold``):
``sync; echo 3 > /proc/sys/vm/drop_caches`` before every launch, which evicts the Python libraries too unless
``--cold-keep-libs`` re-imports them after the drop; once per round, the **floor**: every reshard rank file read at
once right after a drop (one thread each, 64 MiB ``readinto``). The table shows per side the median over rounds and,
as ratio, the median of the rounds' ratios: transformers ÷ reshard for times (higher is better for reshard), reshard ÷
transformers for memory (lower is better); the extra sides' rows compare loads the same way (their value in the
transformers column). PASS/FAIL at world 2 only (other worlds for information). Goals:

- dense: load ≥ 8×, resident ≥ 6×, first forward ≥ 1×, peak RSS ≤ 0.7×, whole process (ready, logits) ≥ 1×;
- moe: resident ≥ 25×, first logits ≥ 8×, peak RSS ≤ 0.4× (the rest for information);
- both, with ``--dcp``: reshard's load ≥ 10× the load of ``transformers_dcp``; cold: reshard's resident ≤ 1.1× the
  floor.

Logits parity, every rank, from the last launch of each side, reported under the run's notes: every other side
against reshard, ``torch.equal`` (expected of transformers' plain TP load), ``torch.allclose`` at bf16 tolerance and
the max |diff|. A second table splits each side's time (imports, load, forwards, page faults, anonymous / file RSS).
``coldstart_phases.py`` splits reshard's load.

    python benchmarks/coldstart.py [--model dense|moe] [--world 2 4] [--repeat 3] [--work ./bench-out]
                                   [--skip-cold] [--layers N] [--experts E] [--dcp] [--regrid]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_checkpoint import (  # noqa: E402
    FULL_LAYERS,
    MOE_EXPERTS,
    MOE_LAYERS,
    make_qwen3_moe_checkpoint,
    make_smollm2_checkpoint,
)

WORKER = HERE / "coldstart_worker.py"
DCP_SAVER = HERE / "dcp_save_worker.py"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
DCP = "transformers_dcp"  # --dcp: transformers loading its own distributed checkpoint
REGRID = "reshard_regrid"  # --regrid: reshard loading an artifact converted for twice the world's tp
LIBRARIES = "import torch, torch.distributed.tensor, transformers, reshard.loaders; transformers.{model_class}"
GOAL_WORLD = 2
DCP_LOAD_GOAL = 10.0  # reshard's load against transformers' load of its distributed checkpoint


@dataclass(frozen=True)
class Metric:
    """A measured quantity and its goal (``None``: for information): ``ratio >= goal`` for times, ``<=`` for RSS."""

    key: str
    label: str
    goal: float | None
    is_time: bool

    def ratio(self, ours: float, theirs: float) -> float:
        """transformers/reshard for a time (higher is better), reshard/transformers for memory (lower is better)."""
        return theirs / ours if self.is_time else ours / theirs

    def passes(self, ratio: float) -> bool:
        """Whether ``ratio`` meets the goal."""
        assert self.goal is not None
        return ratio >= self.goal if self.is_time else ratio <= self.goal


def metrics(
    load: float | None,
    resident: float,
    first_logits: float | None,
    first_forward: float | None,
    rss: float,
    whole: float | None,
) -> tuple[Metric, ...]:
    """The table's rows with one model's goals (``None``: for information)."""
    return (  # server-like: from the call to load (imports done before), perf_counter seconds
        Metric("load", "load (s)", load, True),
        Metric("resident", "resident = first logits - second forward (s)", resident, True),
        Metric("first_logits", "first logits = load + first forward (s)", first_logits, True),
        Metric("first_forward", "first forward (s)", first_forward, True),
        Metric("peak_rss_mb", "peak RSS per rank (MB)", rss, False),
        Metric("ready", "whole process: model ready since process start (s)", whole, True),
        Metric("logits", "whole process: first logits since process start (s)", whole, True),
    )


@dataclass(frozen=True)
class Model:
    """A benchmark model: its checkpoint's folder name, its transformers class, its goals."""

    name: str
    model_class: str
    metrics: tuple[Metric, ...]


MODELS = {
    "dense": Model("smollm2-1.7b", "LlamaForCausalLM", metrics(8.0, 6.0, None, 1.0, 0.7, 1.0)),
    "moe": Model("qwen3-30b-a3b", "Qwen3MoeForCausalLM", metrics(None, 25.0, 8.0, None, 0.4, None)),
}
LOAD = Metric("load", "load (s)", None, True)  # the extra sides' rows: load times compared


@dataclass
class Runs:
    """The launches of one side at one world size and cache state: per launch, the max over ranks of each value."""

    launches: list[dict[str, float]] = field(default_factory=list)

    def median(self, key: str) -> float:
        """The median over launches."""
        return statistics.median(launch[key] for launch in self.launches)


def median_ratio(metric: Metric, ours: Runs, theirs: Runs) -> float:
    """The median of the ratios of launches made one after the other (same index), so load swings cancel."""
    pairs = zip(ours.launches, theirs.launches, strict=True)
    return statistics.median(metric.ratio(a[metric.key], b[metric.key]) for a, b in pairs)


def read_floor(paths: list[Path]) -> float:
    """Seconds to read every file at once, one thread each, 64 MiB ``readinto`` (GIL released): the disk's floor."""

    def read(path: Path) -> None:
        buffer = bytearray(64 << 20)
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass

    started = time.perf_counter()
    threads = [threading.Thread(target=read, args=(path,)) for path in paths]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started


def can_drop_caches() -> bool:
    """True if this process may write ``/proc/sys/vm/drop_caches``."""
    return DROP_CACHES.exists() and os.access(DROP_CACHES, os.W_OK)


def drop_caches(keep_libs: str | None) -> None:
    """Flush dirty pages and drop the page cache; then run ``keep_libs`` (imports) to read the libraries back in."""
    os.sync()
    DROP_CACHES.write_text("3\n")
    if keep_libs:
        subprocess.run([sys.executable, "-c", keep_libs], check=True, capture_output=True)


def artifact_is_complete(out: Path) -> bool:
    """True if ``out`` has a readable manifest and every rank file at the size it records."""
    from reshard.manifests import read_manifest, resolve_in

    try:
        manifest = read_manifest(out)
        files = [manifest.rank_file(rank) for rank in range(manifest.tp)]
        return all(resolve_in(out, f.path).stat().st_size == f.size for f in files)
    except Exception:  # unreadable or partial: convert again
        return False


def ensure_artifact(src: Path, tp: int) -> Path:
    """The reshard tp artifact of ``src`` beside it (``NAME-tpN``), converted if missing or incomplete."""
    out = src.parent / f"{src.name}-tp{tp}"
    if not artifact_is_complete(out):
        import reshard

        started = time.perf_counter()
        reshard.convert(src, out, tp=tp, progress=False, overwrite=out.exists())
        print(f"converted {src} -> {out} in {time.perf_counter() - started:.1f}s", flush=True)
    return out


def ensure_distributed_checkpoint(src: Path, world: int, threads: int) -> Path:
    """transformers' distributed checkpoint of ``src`` saved at tp ``world`` beside it (``NAME-dcp-tpN``), made once.

    ``dcp_save_worker.py`` runs under torchrun into a hidden ``.NAME-dcp-tpN.partial`` folder, renamed into place once
    every rank has saved, so the folder only ever holds a complete checkpoint.
    """
    out = src.parent / f"{src.name}-dcp-tp{world}"
    if (out / "config.json").is_file() and any(out.glob("shard-*-model-*.safetensors")):
        return out
    staging = src.parent / f".{out.name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    command += [str(DCP_SAVER), str(src), str(staging)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise RuntimeError(f"{shlex.join(command)} exited with status {done.returncode}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(staging, out)
    print(f"saved transformers' distributed checkpoint {out} in {time.perf_counter() - started:.1f}s", flush=True)
    return out


def launch(side: str, path: Path, world: int, results: Path, threads: int, mode: str) -> dict[str, float]:
    """One torchrun launch of the worker; the max over ranks of each value it reports."""
    for old in results.glob(f"{side}.rank*"):
        old.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    command += [str(WORKER), side, str(path), str(results), mode]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-6000:])
        raise RuntimeError(f"{shlex.join(command)} exited with status {done.returncode}")
    ranks = [json.loads((results / f"{side}.rank{rank}.json").read_text()) for rank in range(world)]
    flat = [{**r, **{f"{k}_end_mb": v for k, v in r.pop("status_mb").items()}} for r in ranks]
    numeric = [key for key, value in flat[0].items() if isinstance(value, int | float) and not isinstance(value, bool)]
    return {key: max(float(r[key]) for r in flat) for key in numeric}


def same_logits(results: Path, world: int, side: str) -> tuple[bool, bool, float]:
    """Whether every rank's logits of ``side`` and reshard are ``torch.equal``, ``torch.allclose`` at bf16 tolerance
    (rtol 1.6e-2, atol 1e-2), and their max absolute difference (inf if the shapes differ)."""
    import torch
    from safetensors.torch import load_file

    equal, close, diff = True, True, 0.0
    for rank in range(world):
        ours = load_file(results / f"reshard.rank{rank}.safetensors")["logits"]
        theirs = load_file(results / f"{side}.rank{rank}.safetensors")["logits"]
        if ours.shape != theirs.shape:
            return False, False, float("inf")
        equal = equal and bool(torch.equal(ours, theirs))
        close = close and bool(torch.allclose(ours.float(), theirs.float(), rtol=1.6e-2, atol=1e-2))
        diff = max(diff, float((ours.float() - theirs.float()).abs().max()))
    return equal, close, diff


def measure(
    world: int, cache: str, paths: dict[str, Path], results: Path, args: argparse.Namespace
) -> tuple[dict[str, Runs], list[float]]:
    """``repeat`` launches per side (alternating which side goes first), after a warm-up launch if warm; cold, the
    floor too (every rank file read at once right after a drop), once per round."""
    sides = tuple(paths)
    runs, floors = {side: Runs() for side in sides}, []
    files = sorted(paths["reshard"].glob("rank-*.safetensors"))
    keep_libs = LIBRARIES.format(model_class=MODELS[args.model].model_class) if args.cold_keep_libs else None
    if cache == "warm":
        for side in sides:
            launch(side, paths[side], world, results, args.threads, args.mode)
    for index in range(args.repeat):
        if cache == "cold":
            drop_caches(keep_libs)
            floors.append(read_floor(files))
        for side in sides if index % 2 == 0 else sides[::-1]:
            if cache == "cold":
                drop_caches(keep_libs)
            try:
                shown = launch(side, paths[side], world, results, args.threads, args.mode)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # e.g. the library mid-edit: retry once
                print(f"  retrying once after: {exc}", flush=True)
                time.sleep(10)
                if cache == "cold":
                    drop_caches(keep_libs)
                shown = launch(side, paths[side], world, results, args.threads, args.mode)
            runs[side].launches.append(shown)
            with open(results / "launches.jsonl", "a") as log:
                log.write(json.dumps({"world": world, "cache": cache, "side": side, **shown}) + "\n")
            print(
                f"  world {world} {cache} #{index + 1} {side:16s} load {shown['load']:6.2f}s "
                f"first fwd {shown['first_forward']:6.2f}s second {shown['second_forward']:6.2f}s "
                f"resident {shown['resident']:6.2f}s rss {shown['peak_rss_mb']:6.0f} MB"
                + (f" floor {floors[-1]:.2f}s" if floors else ""),
                flush=True,
            )
    return runs, floors


def table(model: str, measured: dict[tuple[int, str], tuple[dict[str, Runs], list[float]]]) -> str:
    """The markdown table of ``model``'s goals: medians, the median of same-run ratios, PASS/FAIL at world 2."""
    lines = [
        "| model | world | cache | metric | reshard | transformers | ratio | goal | result |",
        "|---|---:|---|---|---:|---:|---:|---|---|",
    ]

    def row(world: int, cache: str, cells: tuple[str, str, str, str, str], ok: bool | None) -> None:
        """One line: label, reshard, other side, ratio, goal, then PASS/FAIL (world 2 only) or info."""
        verdict = "info" if ok is None else "PASS" if ok else "FAIL"
        if ok is not None and world != GOAL_WORLD:
            verdict = f"({verdict.lower()}, info)"
        lines.append(f"| {model} | {world} | {cache} | {' | '.join(cells)} | {verdict} |")

    for (world, cache), (runs, floors) in measured.items():
        for metric in MODELS[model].metrics:
            ours, theirs = runs["reshard"].median(metric.key), runs["transformers"].median(metric.key)
            ratio = median_ratio(metric, runs["reshard"], runs["transformers"])
            goal = "" if metric.goal is None else f"{'≥' if metric.is_time else '≤'} {metric.goal:g}×"
            ok = None if metric.goal is None else metric.passes(ratio)
            d = 2 if metric.is_time else 0
            row(world, cache, (metric.label, f"{ours:.{d}f}", f"{theirs:.{d}f}", f"{ratio:.2f}×", goal), ok)
        native = runs["reshard"].median("load")
        if DCP in runs:  # transformers on its own sharded checkpoint: the closest thing it has to reshard
            ratio = median_ratio(LOAD, runs["reshard"], runs[DCP])
            label, dcp = "load (s) vs transformers on its distributed checkpoint", runs[DCP].median("load")
            cells = (label, f"{native:.2f}", f"{dcp:.2f}", f"{ratio:.2f}×", f"≥ {DCP_LOAD_GOAL:g}×")
            row(world, cache, cells, ratio >= DCP_LOAD_GOAL)
        if REGRID in runs:  # the cost of loading at another world size, against the native artifact
            ratio = median_ratio(LOAD, runs["reshard"], runs[REGRID])
            label = f"load (s) of a tp {2 * world} artifact on {world} ranks vs the tp {world} one"
            regrid = runs[REGRID].median("load")
            row(world, cache, (label, f"{regrid:.2f}", f"(native {native:.2f})", f"{ratio:.2f}× slower", ""), None)
        if floors:
            floor, resident = statistics.median(floors), runs["reshard"].median("resident")
            label = f"reshard resident ÷ floor (every rank file read at once: {floor:.2f} s)"
            cells = (label, f"{resident:.2f}", "", f"{resident / floor:.2f}×", "≤ 1.1×")
            row(world, cache, cells, resident <= 1.1 * floor)
    return "\n".join(lines)


def breakdown(measured: dict[tuple[int, str], tuple[dict[str, Runs], list[float]]]) -> str:
    """Medians of where each side's time goes: imports, load, both forwards, faults; memory split."""
    lines = [
        "| world | cache | side | imports done s | load s | first fwd s | second fwd s | faults in load / "
        "first fwd | RssAnon / RssFile at end MB |",
        "|---:|---|---|---:|---:|---:|---:|---|---|",
    ]
    for (world, cache), (runs, _) in measured.items():
        for side in runs:
            m = runs[side].median
            lines.append(
                f"| {world} | {cache} | {side} | {m('imported'):.2f} | {m('load'):.2f} | {m('first_forward'):.2f} | "
                f"{m('second_forward'):.2f} | {m('load_faults'):.0f} / {m('forward_faults'):.0f} | "
                f"{m('RssAnon_end_mb'):.0f} / {m('RssFile_end_mb'):.0f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", type=int, nargs="+", default=[2, 4], help="world sizes (tp) [2 4]")
    parser.add_argument("--repeat", type=int, default=3, help="measured launches per side and setting [3]")
    parser.add_argument("--work", type=Path, default=Path("bench-out"), help="checkpoint folder [./bench-out]")
    parser.add_argument("--skip-cold", action="store_true", help="warm page cache only")
    parser.add_argument("--cold-keep-libs", action="store_true", help="cold: re-read the Python libraries")
    parser.add_argument("--model", choices=sorted(MODELS), default="dense", help="SmolLM2-1.7B or Qwen3-30B-A3B shapes")
    parser.add_argument("--layers", type=int, help=f"decoder layers [dense {FULL_LAYERS}, moe {MOE_LAYERS}]")
    parser.add_argument("--experts", type=int, default=MOE_EXPERTS, help=f"moe: experts per layer [{MOE_EXPERTS}]")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank [1]")
    parser.add_argument(
        "--mode", choices=["server", "process"], default="server", help="imports before the load is timed [server]"
    )
    parser.add_argument(
        "--regrid", action="store_true", help="also load a tp 2N artifact on N ranks (load at another world size)"
    )
    parser.add_argument(
        "--dcp", action="store_true", help="also time transformers on its distributed checkpoint (made once, cached)"
    )
    args = parser.parse_args(argv)
    layers = args.layers if args.layers is not None else FULL_LAYERS if args.model == "dense" else MOE_LAYERS
    if args.repeat < 1 or layers < 1:
        parser.error("--repeat and --layers must be at least 1")
    if args.model == "dense" and args.experts != MOE_EXPERTS:
        parser.error("--experts applies to --model moe only")
    if args.model == "moe" and args.experts < 8:
        parser.error("--experts must be at least 8 (the active experts per token)")

    if args.model == "dense":
        name = MODELS["dense"].name + ("" if layers == FULL_LAYERS else f"-L{layers}")
        src = make_smollm2_checkpoint(args.work / name, layers)
    else:  # named for its layers always: the real model has 48
        name = f"{MODELS['moe'].name}-L{layers}" + ("" if args.experts == MOE_EXPERTS else f"-E{args.experts}")
        src = make_qwen3_moe_checkpoint(args.work / name, layers, args.experts)
    caches = ["warm"]
    notes = [f"checkpoint {src} ({sum(p.stat().st_size for p in src.glob('*.safetensors')) / 1e9:.2f} GB)"]
    if not args.skip_cold:
        if can_drop_caches():
            caches.append("cold")
        else:
            notes.append(f"cold runs skipped: {DROP_CACHES} is not writable")
    notes.append(f"load average at start: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    measured: dict[tuple[int, str], tuple[dict[str, Runs], list[float]]] = {}
    logits: list[str] = []
    for world in args.world:
        paths = {"reshard": ensure_artifact(src, world), "transformers": src}
        if args.dcp:
            paths[DCP] = ensure_distributed_checkpoint(src, world, args.threads)
        if args.regrid:
            try:
                paths[REGRID] = ensure_artifact(src, 2 * world)
            except Exception as exc:  # e.g. tp 2N above the model's KV heads: refused by reshard's preflight
                notes.append(f"world {world}: no tp {2 * world} artifact to regrid from: {exc}")
        results = args.work / "coldstart-results" / f"{src.name}-world{world}"
        results.mkdir(parents=True, exist_ok=True)
        for cache in caches:
            try:
                measured[world, cache] = measure(world, cache, paths, results, args)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                notes.append(f"world {world} {cache}: not measured, a launch failed twice: {exc}")
        if not any(key[0] == world for key in measured):
            continue
        for side in paths:
            if side != "reshard":
                equal, close, diff = same_logits(results, world, side)
                logits.append(
                    f"world {world}: first logits, reshard vs {side}, on every rank: torch.equal {equal}, "
                    f"allclose (bf16) {close}, max |diff| {diff:g}"
                )
    notes.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    cold = "libraries re-read after the drop" if args.cold_keep_libs else "libraries evicted too"
    print(f"\n{shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"mode {args.mode}; repeats: {args.repeat} per side and setting (medians); cold = drop_caches, {cold}")
    print("\n".join(notes + logits))
    print(f"\n{table(args.model, measured)}\n\n{breakdown(measured)}")


if __name__ == "__main__":
    main()
