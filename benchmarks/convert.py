"""Time ``reshard --tp N`` against ``cp -r`` on a SmolLM2-1.7B-shaped checkpoint, warm and cold page cache.

Like is compared with like. By default reshard flushes its rank files to disk (fsync) before writing the manifest;
``cp -r`` leaves its copy in the page cache. So each repeat runs, in order: ``cp -r SRC DST`` then ``sync`` (timed
alone and together), ``reshard --tp N SRC -o OUT -q`` (durable) and ``reshard ... --no-fsync`` (page cache, as
cp). Each reshard run is a child process timed with its own peak RSS (``os.wait4``, cross-checked by psutil
polling of its process tree). Goals: durable reshard <= 1.5x cp -r + sync, reshard --no-fsync <= 1.5x
cp -r. Ratios are given two ways: best time over best time, and the median over repeats of the ratio within a
repeat (the runs of one repeat are seconds apart, so this cancels the machine's drift; copy speed on this shared VM
swings by several times from one minute to the next). Peak RSS is the worst run. "cold" drops the page cache
(``echo 3 > /proc/sys/vm/drop_caches``) before each measured command, then re-imports reshard's libraries (cold
checkpoint data, not a cold torch import).

    python benchmarks/convert.py [--tp 8] [--work ./bench-out] [--repeat 5] [--layers 24] [--setups warm,cold]
        [--reshard-args "--workers 2"]
"""

from __future__ import annotations

import argparse
import contextlib
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

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_checkpoint import FULL_LAYERS, is_complete

GOAL_RATIO = 1.5
GOAL_RSS_MB = 1500.0  # 1.5 GB, MB = 10**6 bytes
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
WARM_LIBRARIES = "import torch, xxhash, tqdm, reshard.cli, reshard.commands.convert"


PEERS = ("cp -r", "cp -r + sync", "reshard", "reshard --no-fsync")
# (reshard variant, its like-for-like peer): durable with durable, page cache with page cache
GOALS = (("reshard", "cp -r + sync"), ("reshard --no-fsync", "cp -r"))


@dataclass
class Runs:
    """Every repeat's measurements for one setup (warm or cold): wall seconds per peer, reshard's peak RSS."""

    setup: str
    walls: dict[str, list[float]] = field(default_factory=lambda: {peer: [] for peer in PEERS})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {peer: [] for peer in PEERS})
    rss_mb: list[float] = field(default_factory=list)
    parent_mb: list[float] = field(default_factory=list)  # this process's RSS when it starts a reshard run
    loads: list[float] = field(default_factory=list)

    def best_ratio(self, mine: str, peer: str) -> float:
        return min(self.walls[mine]) / min(self.walls[peer])

    def paired_ratio(self, mine: str, peer: str) -> float:
        """The median over repeats of ``mine / peer`` within each repeat."""
        return statistics.median(a / b for a, b in zip(self.walls[mine], self.walls[peer], strict=True))


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
    polled_mb: float  # psutil, every 100 ms: the child and its descendants summed (a cross-check; cheap)

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
            while not done.wait(0.1):  # polling costs CPU the timed command would otherwise have
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
    """Run ``repeat`` rounds of every peer under ``setup``, cleaning outputs between runs."""
    runs = Runs(setup)
    cold = setup == "cold"
    dst, out = work / "cp-copy", work / f"reshard-tp{tp}"
    command = [*reshard_command(), "--tp", str(tp), str(src), "-o", str(out), "-q", *extra]
    for index in range(repeat):
        clean(dst, out)
        prepare(cold, src)
        load = os.getloadavg()[0]
        cp = run_timed(["cp", "-r", str(src), str(dst)])
        synced = time.perf_counter()
        subprocess.run(["sync"], check=True)
        runs.walls["cp -r"].append(cp.wall)
        runs.cpu["cp -r"].append(cp.cpu)
        runs.walls["cp -r + sync"].append(cp.wall + time.perf_counter() - synced)
        runs.cpu["cp -r + sync"].append(cp.cpu)
        for peer, flags in (("reshard", []), ("reshard --no-fsync", ["--no-fsync"])):
            clean(dst, out)
            prepare(cold, src)
            runs.parent_mb.append(psutil.Process().memory_info().rss / 1e6)
            sample = run_timed([*command, *flags])
            runs.walls[peer].append(sample.wall)
            runs.cpu[peer].append(sample.cpu)
            runs.rss_mb.append(sample.peak_mb)
        runs.loads.append(max(load, os.getloadavg()[0]))
        times = ", ".join(f"{peer} {runs.walls[peer][-1]:.2f}s" for peer in PEERS)
        print(f"  {setup} #{index + 1}: {times}; reshard peak RSS {max(runs.rss_mb[-2:]):.0f} MB; "
              f"load avg {runs.loads[-1]:.1f}", flush=True)  # fmt: skip
    clean(dst, out)
    return runs


def report(results: list[Runs], tp: int, notes: list[str]) -> str:
    """The markdown table, the goals with PASS/FAIL, and notes."""
    lines = [
        f"| setup (tp={tp}) | " + " | ".join(f"{peer} s" for peer in PEERS) + " | reshard peak RSS MB |",
        "|---|" + "---:|" * (len(PEERS) + 1),
    ]
    for r in results:
        best = " | ".join(f"{min(r.walls[peer]):.2f}" for peer in PEERS)
        lines.append(f"| {r.setup} | {best} | {max(r.rss_mb):.0f} |")
    lines.append("")
    lines.append("| setup | ratio | best / best | median within a repeat | goal |")
    lines.append("|---|---|---:|---:|---|")
    for r in results:
        for mine, peer in (*GOALS, ("reshard", "cp -r"), ("cp -r + sync", "cp -r")):
            goal = _verdict(r.paired_ratio(mine, peer) <= GOAL_RATIO) if (mine, peer) in GOALS else "-"
            lines.append(
                f"| {r.setup} | {mine} / {peer} | {r.best_ratio(mine, peer):.2f}x | {r.paired_ratio(mine, peer):.2f}x "
                f"| {f'<= {GOAL_RATIO}x ' + goal if goal != '-' else '-'} |"
            )
    lines.append("")
    for r in results:
        peak = max(r.rss_mb)
        lines.append(f"- {r.setup}: peak RSS <= {GOAL_RSS_MB:.0f} MB: {peak:.0f} MB {_verdict(peak <= GOAL_RSS_MB)}")
        cpu = ", ".join(f"{peer} {min(r.cpu[peer]):.1f}" for peer in ("cp -r", "reshard", "reshard --no-fsync"))
        lines.append(f"- {r.setup}: CPU seconds (user + sys, best): {cpu}")
    lines.extend(f"- note: {note}" for note in notes)
    return "\n".join(lines)


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=8, help="tensor-parallel size [8]")
    parser.add_argument("--work", type=Path, default=Path("bench-out"), help="work folder [./bench-out]")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of every peer [5]")
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
    notes = [f"source {src}: {size / 1e9:.2f} GB, {args.layers} layers; {args.repeat} repeats; RSS MB = 10^6 B"]
    if "cold" in setups and not can_drop_caches():
        setups.remove("cold")
        notes.append("cold: SKIPPED, not permitted to write /proc/sys/vm/drop_caches (run as root)")
    if not setups:
        sys.exit("\n".join(notes))
    print(f"reshard: {' '.join(reshard_command())}; source {src} ({size / 1e9:.2f} GB)", flush=True)
    results = [measure(setup, src, args.work, args.tp, args.repeat, shlex.split(args.reshard_args)) for setup in setups]
    own_mb = max(mb for r in results for mb in r.parent_mb)
    notes.append(f"this process had {own_mb:.0f} MB when it started reshard: its peak RSS is only meaningful above")
    loads = [load for r in results for load in r.loads]
    notes.append(f"1-min load average around the runs: {min(loads):.1f} to {max(loads):.1f} on {os.cpu_count()} CPUs")
    print()
    print(report(results, args.tp, notes))


if __name__ == "__main__":
    main()
