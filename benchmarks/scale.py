"""Re-sharding and parallel conversion on the SmolLM2-1.7B-shaped checkpoint: time and peak RSS, ratios in one run.

    python benchmarks/scale.py [--repeat 2] [--work ./bench-out] [--layers N]

Measures, warm page cache, best of ``--repeat``:
  * source -> tp 8 with one process, and with ``--workers 2`` (ratio 1 worker / 2 workers);
  * tp 8 artifact -> tp 4 (re-shard, no source) against source -> tp 4 (ratio source / re-shard).
Every command is a fresh ``reshard`` process measured with ``wait4`` (wall, CPU, peak RSS).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from convert import Sample, clean, prepare, reshard_command, run_timed
from make_checkpoint import FULL_LAYERS, is_complete


def best(command: list[str], outputs: list[Path], source: Path, repeat: int) -> Sample:
    """The fastest of ``repeat`` runs (peak RSS: the largest seen), outputs removed before each run."""
    samples = []
    for _ in range(repeat):
        clean(*outputs)
        prepare(False, source)
        samples.append(run_timed(command))
    fastest = min(samples, key=lambda s: s.wall)
    return Sample(fastest.wall, fastest.cpu, max(s.maxrss_mb for s in samples), max(s.polled_mb for s in samples))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("bench-out"))
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--layers", type=int, default=FULL_LAYERS)
    args = parser.parse_args(argv)
    name = "smollm2-1.7b" if args.layers == FULL_LAYERS else f"smollm2-{args.layers}l"
    source = args.work / name
    if not is_complete(source):  # in a subprocess: a child's ru_maxrss counts the memory of the parent it forked from
        maker = Path(__file__).resolve().parent / "make_checkpoint.py"
        subprocess.run([sys.executable, str(maker), str(source), "--layers", str(args.layers)], check=True)
    reshard = [*reshard_command(), "-q"]
    tp8, tp8_workers, tp4, resharded = (args.work / f"{name}-{s}" for s in ("tp8", "tp8w2", "tp4", "tp8to4"))

    one = best([*reshard, "--tp", "8", str(source), "-o", str(tp8_workers)], [tp8_workers], source, args.repeat)
    two = best(
        [*reshard, "--tp", "8", str(source), "-o", str(tp8_workers), "--workers", "2"],
        [tp8_workers],
        source,
        args.repeat,
    )
    direct = best([*reshard, "--tp", "4", str(source), "-o", str(tp4)], [tp4], source, args.repeat)
    clean(tp8)
    run_timed([*reshard, "--tp", "8", str(source), "-o", str(tp8)])
    again = best([*reshard, "--tp", "4", str(tp8), "-o", str(resharded)], [resharded], tp8, args.repeat)
    same = all((tp4 / p.name).read_bytes() == p.read_bytes() for p in resharded.glob("rank-*"))

    rows = [
        ("source -> tp8, 1 process", one, ""),
        ("source -> tp8, --workers 2", two, f"{one.wall / two.wall:.2f}x faster than 1 process"),
        ("source -> tp4", direct, ""),
        ("tp8 artifact -> tp4 (no source)", again, f"{direct.wall / again.wall:.2f}x the speed of source -> tp4"),
    ]
    print(f"\n{source} ({sum(p.stat().st_size for p in source.glob('*.safetensors')) / 1e9:.2f} GB), warm cache, "
          f"best of {args.repeat}\n")  # fmt: skip
    print("| conversion | wall s | CPU s | peak RSS MB | ratio |")
    print("|---|---:|---:|---:|---|")
    for label, sample, ratio in rows:
        print(f"| {label} | {sample.wall:.2f} | {sample.cpu:.2f} | {sample.peak_mb:.0f} | {ratio} |")
    print(f"\nre-sharded tp4 rank files byte-identical to source -> tp4: {same}")
    clean(tp8, tp8_workers, tp4, resharded)


if __name__ == "__main__":
    main()
