"""Time ``reshard --tp N`` against ``cp -r`` on a SmolLM2-1.7B-shaped checkpoint, warm and cold page cache.

Each repeat runs, in order: ``cp -r SRC DST`` then ``sync`` (timed alone and together), then
``reshard --tp N SRC -o OUT -q`` as a child process, timed, with its own peak RSS (``os.wait4``, cross-checked by
psutil polling of its process tree). reshard fsyncs its output, so cp -r + sync is the fair peer; both ratios are
printed. Times are the best of the repeats, peak RSS the worst; CPU seconds (user + sys) are shown too, being
steadier than wall time on a shared machine. "cold" drops the page cache (``echo 3 > /proc/sys/vm/drop_caches``)
before each measured command, then re-imports reshard's libraries (cold checkpoint data, not a cold torch import).

    python benchmarks/convert.py [--tp 8] [--work ./bench-out] [--repeat 2] [--layers 24] [--setups warm,cold]
        [--reshard-args "--workers 2"]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import FULL_LAYERS, is_complete

GOAL_RATIO = 1.5
GOAL_RSS_MB = 1500.0  # 1.5 GB, MB = 10**6 bytes
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
WARM_LIBRARIES = "import torch, xxhash, tqdm, reshard.cli, reshard.conversion"


@dataclass
class Runs:
    """Every repeat's measurements for one setup (warm or cold)."""

    setup: str
    cp: list[float] = field(default_factory=list)
    cp_sync: list[float] = field(default_factory=list)
    reshard: list[float] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)
    cp_cpu: list[float] = field(default_factory=list)
    reshard_cpu: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)

    def ratios(self) -> tuple[float, float]:
        """Best reshard time over best cp -r, and over best cp -r + sync."""
        return min(self.reshard) / min(self.cp), min(self.reshard) / min(self.cp_sync)


def reshard_command() -> list[str]:
    """The ``reshard`` console script beside this interpreter (no pyenv shim in the timing), else the one on PATH."""
    beside = Path(sys.executable).parent / "reshard"
    found = str(beside) if beside.is_file() else shutil.which("reshard")
    return [found] if found else [sys.executable, "-m", "reshard"]


def can_drop_caches() -> bool:
    """Try dropping the page cache once: True if this process is allowed to (root, and not a locked-down /proc)."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
    except OSError:
        return False
    return True


def prepare(cold: bool, src: Path) -> None:
    """Flush dirty pages, then either drop the page cache (and re-warm the libraries) or read ``src`` into it."""
    os.sync()
    if cold:
        DROP_CACHES.write_text("3\n")
        subprocess.run([sys.executable, "-c", WARM_LIBRARIES], check=True)
    else:
        for path in sorted(src.iterdir()):
            with open(path, "rb", buffering=0) as handle:
                while handle.read(8 << 20):
                    pass


@dataclass(frozen=True)
class Sample:
    """One child process run: wall and CPU (user + sys) seconds, and peak RSS in MB two ways."""

    wall: float
    cpu: float
    maxrss_mb: float  # ru_maxrss from wait4: the largest single process of the child's tree
    polled_mb: float  # psutil, every 10 ms: the child and its descendants summed

    @property
    def peak_mb(self) -> float:
        return max(self.maxrss_mb, self.polled_mb)


def run_timed(command: list[str]) -> Sample:
    """Run ``command`` to completion and measure it (raises ``CalledProcessError`` if it fails).

    ``ru_maxrss`` of a child also counts the memory of the parent it was forked from (the high-water mark of the
    pre-exec image), so this process keeps small (the checkpoint is made in a subprocess) and reports its own peak.
    """
    started = time.perf_counter()
    child = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    polled = [0]
    done = threading.Event()

    def poll() -> None:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(child.pid)
            while not done.wait(0.01):
                total = 0
                for process in [root, *root.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        total += process.memory_info().rss
                polled[0] = max(polled[0], total)

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    watcher.join()
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise subprocess.CalledProcessError(child.returncode, command)
    # ru_maxrss is KiB on Linux
    return Sample(wall, usage.ru_utime + usage.ru_stime, usage.ru_maxrss * 1024 / 1e6, polled[0] / 1e6)


def clean(*paths: Path) -> None:
    """Remove benchmark outputs and reshard's hidden staging folders (a leftover one would be resumed)."""
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)
        for hidden in (f".{path.name}.partial", f".{path.name}.old"):
            shutil.rmtree(path.parent / hidden, ignore_errors=True)
    os.sync()


def measure(setup: str, src: Path, work: Path, tp: int, repeat: int, extra: list[str]) -> Runs:
    """Run ``repeat`` rounds of cp -r (+ sync) and reshard under ``setup``, cleaning outputs between runs."""
    runs = Runs(setup)
    cold = setup == "cold"
    dst, out = work / "cp-copy", work / f"reshard-tp{tp}"
    for index in range(repeat):
        clean(dst, out)
        prepare(cold, src)
        load = os.getloadavg()[0]
        cp = run_timed(["cp", "-r", str(src), str(dst)])
        synced = time.perf_counter()
        subprocess.run(["sync"], check=True)
        runs.cp.append(cp.wall)
        runs.cp_cpu.append(cp.cpu)
        runs.cp_sync.append(cp.wall + time.perf_counter() - synced)
        clean(dst, out)
        prepare(cold, src)
        load = max(load, os.getloadavg()[0])
        reshard = run_timed([*reshard_command(), "--tp", str(tp), str(src), "-o", str(out), "-q", *extra])
        runs.reshard.append(reshard.wall)
        runs.rss_mb.append(reshard.peak_mb)
        runs.reshard_cpu.append(reshard.cpu)
        runs.loads.append(max(load, os.getloadavg()[0]))
        print(
            f"  {setup} #{index + 1}: cp -r {cp.wall:.2f}s (cpu {cp.cpu:.2f}s), + sync {runs.cp_sync[-1]:.2f}s; "
            f"reshard {reshard.wall:.2f}s (cpu {reshard.cpu:.2f}s), peak RSS {reshard.maxrss_mb:.0f} MB "
            f"(psutil {reshard.polled_mb:.0f} MB); load avg {runs.loads[-1]:.1f}",
            flush=True,
        )
    clean(dst, out)
    return runs


def report(results: list[Runs], tp: int, notes: list[str]) -> str:
    """The markdown table, the goals with PASS/FAIL, and notes."""
    lines = [
        f"| setup (tp={tp}) | reshard s | cp -r s | cp -r + sync s | reshard / cp -r | reshard / (cp -r + sync) "
        "| reshard peak RSS MB | CPU s reshard / cp -r |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        to_cp, to_cp_sync = r.ratios()
        lines.append(
            f"| {r.setup} | {min(r.reshard):.2f} | {min(r.cp):.2f} | {min(r.cp_sync):.2f} | {to_cp:.2f}x "
            f"| {to_cp_sync:.2f}x | {max(r.rss_mb):.0f} | {min(r.reshard_cpu):.1f} / {min(r.cp_cpu):.1f} |"
        )
    lines.append("")
    for r in results:
        to_cp, to_cp_sync = r.ratios()
        for label, ratio in (("cp -r + sync (fair peer)", to_cp_sync), ("cp -r alone", to_cp)):
            lines.append(f"- {r.setup}: time <= {GOAL_RATIO}x {label}: {ratio:.2f}x {_verdict(ratio <= GOAL_RATIO)}")
        peak = max(r.rss_mb)
        lines.append(f"- {r.setup}: peak RSS <= {GOAL_RSS_MB:.0f} MB: {peak:.0f} MB {_verdict(peak <= GOAL_RSS_MB)}")
    lines.extend(f"- note: {note}" for note in notes)
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel size [8]")
    parser.add_argument("--work", type=Path, default=Path("bench-out"), help="work folder [./bench-out]")
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement; best time is kept [2]")
    parser.add_argument("--layers", type=int, default=FULL_LAYERS, help="decoder layers (fewer for a smoke run)")
    parser.add_argument("--reshard-args", default="", help='extra reshard arguments, e.g. "--workers 2"')
    parser.add_argument("--setups", default="warm,cold", help="comma-separated: warm, cold [warm,cold]")
    args = parser.parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    if args.repeat < 1 or args.layers < 1 or not setups or set(setups) - {"warm", "cold"}:
        parser.error("--repeat and --layers must be >= 1 and --setups a list of warm, cold")

    name = "smollm2-1.7b" if args.layers == FULL_LAYERS else f"smollm2-1.7b-{args.layers}layers"
    src = args.work / name
    if not is_complete(src):  # in a subprocess: this process must stay small (see run_timed)
        maker = Path(__file__).resolve().parent / "make_checkpoint.py"
        subprocess.run([sys.executable, str(maker), str(src), "--layers", str(args.layers)], check=True)
    size = sum(p.stat().st_size for p in src.iterdir() if p.is_file())
    notes = [f"source {src}: {size / 1e9:.2f} GB, {args.layers} layers; best of {args.repeat}; RSS MB = 10^6 B"]
    if "cold" in setups and not can_drop_caches():
        setups.remove("cold")
        notes.append("cold: SKIPPED, not permitted to write /proc/sys/vm/drop_caches (run as root)")
    if not setups:
        sys.exit("\n".join(notes))
    print(f"reshard: {' '.join(reshard_command())}; source {src} ({size / 1e9:.2f} GB)", flush=True)
    results = [measure(setup, src, args.work, args.tp, args.repeat, shlex.split(args.reshard_args)) for setup in setups]
    own_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    notes.append(f"this process peaked at {own_mb:.0f} MB: reshard's peak RSS is only meaningful above that")
    loads = [load for r in results for load in r.loads]
    notes.append(f"1-min load average around the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs")
    print()
    print(report(results, args.tp, notes))


if __name__ == "__main__":
    main()
