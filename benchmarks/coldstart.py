"""Cold start per rank: reshard's ``load_model`` on a tp artifact vs transformers' TP ``from_pretrained``.

On a SmolLM2-1.7B-shaped checkpoint (bf16, 3.42 GB; made with ``make_checkpoint.py`` if missing) and its reshard
tp artifacts (converted if missing), every measurement is a fresh ``torchrun --nproc-per-node N`` launch of
``coldstart_worker.py``, so interpreter start-up and all imports are counted. Each rank records, from its own process
start (``/proc/self/stat``, 10 ms ticks): time to model ready (the model object returned), time to first logits (one
forward of 8 tokens under ``no_grad``), and its peak RSS (``ru_maxrss``, which counts the pages of mapped files the
process touched as well as its anonymous memory). A launch's value is the max over its ranks; the table shows the
best (min) time and the worst (max) peak RSS over ``--repeat`` launches. Warm: one untimed launch per side first.
Cold: ``sync; echo 3 > /proc/sys/vm/drop_caches`` right before every launch, which also evicts the Python libraries
(torch, transformers), unless ``--cold-keep-libs`` re-imports them after the drop. Both libraries init the process
group themselves (gloo); both get ``OMP_NUM_THREADS=--threads`` and ``TRANSFORMERS_VERBOSITY=error``. The run also
checks that both give the same logits (``torch.equal``, every rank). ``coldstart_phases.py`` splits reshard's time.

``--regrid`` adds a third side: reshard loading the tp 2N artifact on N ranks (each rank cuts its slices out of two
old rank files), reported against the native tp N artifact's load.

    python benchmarks/coldstart.py [--world 2 4] [--repeat 3] [--work ./bench-out] [--skip-cold] [--layers 24]
                                   [--regrid]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_checkpoint import FULL_LAYERS, make_smollm2_checkpoint  # noqa: E402

WORKER = HERE / "coldstart_worker.py"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
SIDES = ("reshard", "transformers")
REGRID = "reshard_regrid"  # --regrid: reshard loading an artifact converted for twice the world's tp
LIBRARIES = "import torch, torch.distributed.tensor, transformers, reshard.loaders; transformers.LlamaForCausalLM"
GOAL_WORLD = 2


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


METRICS = (  # server-like: from the call to load (imports done before), perf_counter seconds
    Metric("load", "load (s)", 8.0, True),
    Metric("resident", "resident = first logits - second forward (s)", 6.0, True),
    Metric("first_logits", "load + first forward (s)", None, True),
    Metric("first_forward", "first forward (s)", 1.0, True),
    Metric("peak_rss_mb", "peak RSS per rank (MB)", 0.7, False),
    Metric("ready", "whole process: model ready since process start (s)", 1.0, True),
    Metric("logits", "whole process: first logits since process start (s)", 1.0, True),
)


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


def drop_caches(keep_libs: bool) -> None:
    """Flush dirty pages and drop the page cache; with ``keep_libs`` read the Python libraries back in."""
    os.sync()
    DROP_CACHES.write_text("3\n")
    if keep_libs:
        subprocess.run([sys.executable, "-c", LIBRARIES], check=True, capture_output=True)


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


def same_logits(results: Path, world: int) -> tuple[bool, float]:
    """Whether every rank's logits are ``torch.equal`` between the two sides, and the max absolute difference."""
    import torch
    from safetensors.torch import load_file

    equal, diff = True, 0.0
    for rank in range(world):
        ours = load_file(results / f"reshard.rank{rank}.safetensors")["logits"]
        theirs = load_file(results / f"transformers.rank{rank}.safetensors")["logits"]
        equal = equal and ours.shape == theirs.shape and bool(torch.equal(ours, theirs))
        if ours.shape == theirs.shape:
            diff = max(diff, float((ours.float() - theirs.float()).abs().max()))
    return equal, diff


def measure(
    world: int, cache: str, paths: dict[str, Path], results: Path, args: argparse.Namespace
) -> tuple[dict[str, Runs], list[float]]:
    """``repeat`` launches per side (alternating which side goes first), after a warm-up launch if warm; cold, the
    floor too (every rank file read at once right after a drop), once per round."""
    sides = tuple(paths)
    runs, floors = {side: Runs() for side in sides}, []
    files = sorted(paths["reshard"].glob("rank-*.safetensors"))
    if cache == "warm":
        for side in sides:
            launch(side, paths[side], world, results, args.threads, args.mode)
    for index in range(args.repeat):
        if cache == "cold":
            drop_caches(args.cold_keep_libs)
            floors.append(read_floor(files))
        for side in sides if index % 2 == 0 else sides[::-1]:
            if cache == "cold":
                drop_caches(args.cold_keep_libs)
            try:
                shown = launch(side, paths[side], world, results, args.threads, args.mode)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # e.g. the library mid-edit: retry once
                print(f"  retrying once after: {exc}", flush=True)
                time.sleep(10)
                if cache == "cold":
                    drop_caches(args.cold_keep_libs)
                shown = launch(side, paths[side], world, results, args.threads, args.mode)
            runs[side].launches.append(shown)
            with open(results / "launches.jsonl", "a") as log:
                log.write(json.dumps({"world": world, "cache": cache, "side": side, **shown}) + "\n")
            print(
                f"  world {world} {cache} #{index + 1} {side:12s} load {shown['load']:6.2f}s "
                f"first fwd {shown['first_forward']:6.2f}s second {shown['second_forward']:6.2f}s "
                f"resident {shown['resident']:6.2f}s rss {shown['peak_rss_mb']:6.0f} MB"
                + (f" floor {floors[-1]:.2f}s" if floors else ""),
                flush=True,
            )
    return runs, floors


def table(measured: dict[tuple[int, str], tuple[dict[str, Runs], list[float]]]) -> str:
    """The markdown table of the goals: medians, the median of same-run ratios, PASS/FAIL at world 2."""
    lines = [
        "| world | cache | metric | reshard | transformers | ratio | goal | result |",
        "|---:|---|---|---:|---:|---:|---|---|",
    ]
    for (world, cache), (runs, floors) in measured.items():
        for metric in METRICS:
            ours, theirs = runs["reshard"].median(metric.key), runs["transformers"].median(metric.key)
            ratio = median_ratio(metric, runs["reshard"], runs["transformers"])
            if metric.goal is None:
                goal, verdict = "", "info"
            else:
                goal = f"≥ {metric.goal:g}×" if metric.is_time else f"≤ {metric.goal:g}×"
                verdict = "PASS" if metric.passes(ratio) else "FAIL"
                verdict = verdict if world == GOAL_WORLD else f"({verdict.lower()}, info)"
            digits = 2 if metric.is_time else 0
            lines.append(
                f"| {world} | {cache} | {metric.label} | {ours:.{digits}f} | {theirs:.{digits}f} | "
                f"{ratio:.2f}× | {goal} | {verdict} |"
            )
        if REGRID in runs:  # the cost of loading at another world size, against the native artifact
            regrid, native = runs[REGRID].median("load"), runs["reshard"].median("load")
            ratio = median_ratio(METRICS[0], runs["reshard"], runs[REGRID])
            lines.append(
                f"| {world} | {cache} | reshard load of a tp {2 * world} artifact on {world} ranks vs the tp {world} "
                f"one (s) | {regrid:.2f} | (native {native:.2f}) | {ratio:.2f}× slower | | info |"
            )
        if floors:
            floor = statistics.median(floors)
            resident = runs["reshard"].median("resident")
            ok = "PASS" if resident <= 1.1 * floor else "FAIL"
            lines.append(
                f"| {world} | {cache} | reshard resident ÷ floor (every rank file read at once: "
                f"{floor:.2f} s) | {resident:.2f} | | {resident / floor:.2f}× | ≤ 1.1× | {ok} |"
            )
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
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers (fewer for a smoke run)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every rank [1]")
    parser.add_argument(
        "--mode", choices=["server", "process"], default="server", help="imports before the load is timed [server]"
    )
    parser.add_argument(
        "--regrid", action="store_true", help="also load a tp 2N artifact on N ranks (load at another world size)"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.layers < 1:
        parser.error("--repeat and --layers must be at least 1")

    name = "smollm2-1.7b" if args.layers == FULL_LAYERS else f"smollm2-1.7b-L{args.layers}"
    src = make_smollm2_checkpoint(args.work / name, args.layers)
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
        if args.regrid:
            paths[REGRID] = ensure_artifact(src, 2 * world)
        results = args.work / "coldstart-results" / f"world{world}"
        results.mkdir(parents=True, exist_ok=True)
        for cache in caches:
            try:
                measured[world, cache] = measure(world, cache, paths, results, args)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                notes.append(f"world {world} {cache}: not measured, a launch failed twice: {exc}")
        if not any(key[0] == world for key in measured):
            continue
        equal, diff = same_logits(results, world)
        logits.append(f"world {world}: first logits torch.equal on every rank: {equal} (max |diff| {diff:g})")
    notes.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    cold = "libraries re-read after the drop" if args.cold_keep_libs else "libraries evicted too"
    print(f"\n{shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"mode {args.mode}; repeats: {args.repeat} per side and setting (medians); cold = drop_caches, {cold}")
    print("\n".join(notes + logits))
    print(f"\n{table(measured)}\n\n{breakdown(measured)}")


if __name__ == "__main__":
    main()
