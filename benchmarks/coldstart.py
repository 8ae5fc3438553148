"""Cold start per rank: reshard's ``load_model`` on a tp artifact vs transformers' ``from_pretrained(tp_plan="auto")``.

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

    python benchmarks/coldstart.py [--world 2 4] [--repeat 3] [--work ./bench-out] [--skip-cold] [--layers 24]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from make_checkpoint import FULL_LAYERS, make_smollm2_checkpoint  # noqa: E402

WORKER = HERE / "coldstart_worker.py"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
SIDES = ("reshard", "transformers")
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


METRICS = (
    Metric("ready", "time to model ready (s)", 6.0, True),
    Metric("logits", "time to first logits (s)", 3.0, True),
    Metric("peak_rss_mb", "peak RSS per rank (MB)", 0.7, False),
    Metric("ready_cpu", "CPU s (user+sys) to model ready", None, True),
    Metric("logits_cpu", "CPU s (user+sys) to first logits", None, True),
)


@dataclass
class Runs:
    """The launches of one side at one world size and cache state: per launch, the max over ranks of each value."""

    launches: list[dict[str, float]] = field(default_factory=list)

    def best(self, key: str) -> float:
        """Min over launches for a time, max (worst) for memory."""
        values = [launch[key] for launch in self.launches]
        return max(values) if key.endswith("_mb") else min(values)


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


def launch(side: str, path: Path, world: int, results: Path, threads: int) -> dict[str, float]:
    """One torchrun launch of the worker; the max over ranks of each value it reports."""
    for old in results.glob(f"{side}.rank*"):
        old.unlink()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
    command += [str(WORKER), side, str(path), str(results)]
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
    world: int, cache: str, paths: dict[str, Path], results: Path, repeat: int, threads: int, keep_libs: bool
) -> dict[str, Runs]:
    """``repeat`` launches per side (alternating which side goes first), after a warm-up launch if warm."""
    runs = {side: Runs() for side in SIDES}
    if cache == "warm":
        for side in SIDES:
            launch(side, paths[side], world, results, threads)
    for index in range(repeat):
        for side in SIDES if index % 2 == 0 else SIDES[::-1]:
            if cache == "cold":
                drop_caches(keep_libs)
            try:
                shown = launch(side, paths[side], world, results, threads)
            except (RuntimeError, subprocess.TimeoutExpired) as exc:  # e.g. the library mid-edit: retry once
                print(f"  retrying once after: {exc}", flush=True)
                time.sleep(10)
                if cache == "cold":
                    drop_caches(keep_libs)
                shown = launch(side, paths[side], world, results, threads)
            runs[side].launches.append(shown)
            with open(results / "launches.jsonl", "a") as log:
                log.write(json.dumps({"world": world, "cache": cache, "side": side, **shown}) + "\n")
            print(
                f"  world {world} {cache} #{index + 1} {side:12s} ready {shown['ready']:6.2f}s "
                f"logits {shown['logits']:6.2f}s rss {shown['peak_rss_mb']:7.0f} MB",
                flush=True,
            )
    return runs


def table(measured: dict[tuple[int, str], dict[str, Runs]]) -> str:
    """The markdown table of the goals: best values, ratios, PASS/FAIL (goals apply at world 2; others are info)."""
    lines = [
        "| world | cache | metric | reshard | transformers | ratio | goal | result |",
        "|---:|---|---|---:|---:|---:|---|---|",
    ]
    for (world, cache), runs in measured.items():
        for metric in METRICS:
            ours, theirs = runs["reshard"].best(metric.key), runs["transformers"].best(metric.key)
            ratio = metric.ratio(ours, theirs)
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
    return "\n".join(lines)


def breakdown(measured: dict[tuple[int, str], dict[str, Runs]]) -> str:
    """Where each side's time goes (best launch by time to ready): start-up, imports, load, forward; memory split."""
    lines = [
        "| world | cache | side | interpreter up s | imports done s | model ready s | first logits s | "
        "CPU s to ready | RssAnon / RssFile at end MB | major faults |",
        "|---:|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for (world, cache), runs in measured.items():
        for side in SIDES:
            best: dict[str, Any] = min(runs[side].launches, key=lambda launch: launch["ready"])
            lines.append(
                f"| {world} | {cache} | {side} | {best['first_line']:.2f} | {best['imported']:.2f} | "
                f"{best['ready']:.2f} | {best['logits']:.2f} | {best['ready_cpu']:.2f} | "
                f"{best['RssAnon_end_mb']:.0f} / {best['RssFile_end_mb']:.0f} | {best['major_faults']:.0f} |"
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
    measured: dict[tuple[int, str], dict[str, Runs]] = {}
    logits: list[str] = []
    for world in args.world:
        paths = {"reshard": ensure_artifact(src, world), "transformers": src}
        results = args.work / "coldstart-results" / f"world{world}"
        results.mkdir(parents=True, exist_ok=True)
        for cache in caches:
            try:
                measured[world, cache] = measure(
                    world, cache, paths, results, args.repeat, args.threads, args.cold_keep_libs
                )
            except (RuntimeError, subprocess.TimeoutExpired) as exc:
                notes.append(f"world {world} {cache}: not measured, a launch failed twice: {exc}")
        if not any(key[0] == world for key in measured):
            continue
        equal, diff = same_logits(results, world)
        logits.append(f"world {world}: first logits torch.equal on every rank: {equal} (max |diff| {diff:g})")
    notes.append(f"load average at end: {os.getloadavg()[0]:.2f}")
    cold = "libraries re-read after the drop" if args.cold_keep_libs else "libraries evicted too"
    print(f"\n{shlex.join([Path(sys.executable).name, *sys.argv])}")
    print(f"repeats: {args.repeat} per side and setting (best time, worst RSS); cold = drop_caches, {cold}")
    print("\n".join(notes + logits))
    print(f"\n{table(measured)}\n\n{breakdown(measured)}")


if __name__ == "__main__":
    main()
