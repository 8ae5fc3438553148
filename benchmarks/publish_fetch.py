"""Per-rank download through S3: reshard's ``fetch_artifact`` (one rank file each) vs the whole checkpoint per rank.

An S3-compatible server (moto's server mode) runs on 127.0.0.1 inside this process. The SmolLM2-1.7B-shaped
checkpoint (bf16, 3.42 GB; made with ``make_checkpoint.py`` if missing) is stored as is, what ranks download today
(put straight into the server's store, untimed). Its tp artifact (converted if missing) is published with
``publish()`` (timed), then published again (a retry with nothing left to send). Then, for each side, one
``torchrun --nproc-per-node TP`` launch of this script in ``--worker`` mode, each rank with its own empty cache, as
on separate nodes:

- ``reshard``: ``fetch_artifact(s3://..., rank)`` then ``load_model(folder)``;
- ``today``:   s3fs ``get_file`` of every checkpoint file, then
  ``from_pretrained(folder, distributed_config=DistributedConfig(tp_size=TP))``.

Bytes per rank are what the server sent to that process (botocore puts ``AWS_SDK_UA_APP_ID=rankR`` in its
User-Agent; the server records every response body); "of other ranks" counts other ranks' rank files among them.
Times: the download call alone, then seconds from the worker's first line (imports included) to downloaded and to
model ready (the model object returned; ``--no-load`` skips loading). Both sides download one file at a time with
one GET each (moto re-reads a whole object for every ranged GET, so parallel ranged downloads would time moto).
Loopback through moto shows bytes and client overhead, not a real network: moto serves from Python.

    python benchmarks/publish_fetch.py [--work ./bench-out] [--tp 2] [--layers 24] [--no-load]
"""

import time  # first: a worker's clock starts before its imports

_STARTED = time.perf_counter()

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "bench"
GB = 1e9


def worker(side: str, uri: str, cache: Path, out: Path, load: bool) -> None:
    """One rank: download its share (``side``), optionally build the model, write its times as JSON."""
    rank = int(os.environ["RANK"])
    os.environ["AWS_SDK_UA_APP_ID"] = f"rank{rank}"  # lets the server attribute each request to this rank
    local = cache / f"rank{rank}"
    if side == "reshard":
        from reshard.loaders.fetch import fetch_artifact

        started = time.perf_counter()
        folder = fetch_artifact(uri, rank, cache_dir=local, progress=False)
    else:
        from reshard.manifests.locations import StoreLocation
        from reshard.manifests.stores import open_filesystem

        started = time.perf_counter()
        fs, folder = open_filesystem(StoreLocation("s3", BUCKET)), local
        folder.mkdir(parents=True)
        for name in fs.ls(uri.removeprefix("s3://"), detail=False):  # one GET per file, like fetch_artifact
            fs.get_file(name, str(folder / name.rsplit("/", 1)[-1]), max_concurrency=1)
    marks: dict[str, Any] = {"fetch": time.perf_counter() - started, "downloaded": time.perf_counter() - _STARTED}
    if load:
        if side == "reshard":
            from reshard.loaders import load_model

            load_model(folder)
        else:
            from transformers import AutoModelForCausalLM, DistributedConfig

            tp = DistributedConfig(tp_size=int(os.environ["WORLD_SIZE"]))  # the model's own ("auto") plan
            AutoModelForCausalLM.from_pretrained(folder, distributed_config=tp)
        marks["ready"] = time.perf_counter() - _STARTED
    (out / f"{side}.rank{rank}.json").write_text(json.dumps(marks))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("bench-out"))
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--layers", type=int, default=24, help="fewer layers for a quick run (24: full size)")
    parser.add_argument("--no-load", dest="load", action="store_false", help="download only, no model")
    parser.add_argument("--worker", nargs=4, metavar=("SIDE", "URI", "CACHE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        side, uri, cache, out = args.worker
        worker(side, uri, Path(cache), Path(out), args.load)
        return

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from make_checkpoint import make_smollm2_checkpoint

    import reshard
    from reshard.commands.publish import publish
    from reshard.manifests import read_manifest
    from reshard.manifests.locations import StoreLocation
    from reshard.manifests.stores import open_filesystem
    from tests.helpers.s3_server import RecordingMotoServer

    work = args.work.absolute()
    checkpoint = make_smollm2_checkpoint(
        work / f"smollm2-1.7b{'' if args.layers == 24 else f'-L{args.layers}'}", args.layers
    )
    artifact = checkpoint.parent / f"{checkpoint.name}-tp{args.tp}"
    if not (artifact / "manifest.json").is_file():
        reshard.convert(checkpoint, artifact, tp=args.tp, progress=False)
    manifest = read_manifest(artifact)

    server = RecordingMotoServer()
    server.start()
    scratch = work / "publish-fetch"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    os.environ.update(
        AWS_ENDPOINT_URL=server.endpoint,
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_CONFIG_FILE=str(scratch / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(scratch / "no-aws-credentials"),
    )
    fs = open_filesystem(StoreLocation("s3", BUCKET))
    fs.mkdir(BUCKET)
    sources = {"today": f"s3://{BUCKET}/{checkpoint.name}", "reshard": f"s3://{BUCKET}/{artifact.name}"}
    _store_directly(checkpoint, BUCKET, checkpoint.name)
    started = time.perf_counter()
    publish(artifact, sources["reshard"], progress=False)
    publish_s = time.perf_counter() - started
    started = time.perf_counter()
    publish(artifact, sources["reshard"], progress=False)
    republish_s = time.perf_counter() - started

    results: dict[str, list[dict[str, Any]]] = {}
    for side in ("reshard", "today"):
        server.requests.clear()
        cache, out = scratch / f"{side}-cache", scratch / f"{side}-out"
        out.mkdir()
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={args.tp}"]
        command += ["--master-addr=127.0.0.1", f"--master-port={_free_port()}", __file__]
        command += [*(["--no-load"] if not args.load else []), "--worker", side, sources[side], str(cache), str(out)]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
        results[side] = []
        for rank in range(args.tp):
            marks = json.loads((out / f"{side}.rank{rank}.json").read_text())
            got = [r for r in server.requests if r.method == "GET" and f"app/rank{rank} " in r.agent + " "]
            marks["bytes"] = sum(r.sent for r in got)
            others = [f.path for f in manifest.files if f.rank not in (None, rank)]  # today: every file is needed
            marks["other_ranks"] = sum(r.sent for r in got if any(r.path.endswith("/" + name) for name in others))
            results[side].append(marks)
        shutil.rmtree(cache)
    server.stop()

    rank_bytes = sum(f.size for f in manifest.files if f.rank is not None)
    print(
        f"\nSmolLM2-1.7B shapes, {args.layers} layers: checkpoint {_size(checkpoint)} GB, artifact tp={args.tp} "
        f"({rank_bytes / GB:.2f} GB in rank files), S3 server on loopback (moto)"
    )
    print(f"publish (first) {publish_s:.1f} s; publish again (all files already there) {republish_s:.2f} s")
    header = ("side", "rank", "GB downloaded", "of other ranks", "download s", "downloaded at s", "model ready at s")
    print("\n" + "".join(f"{h:>17}" for h in header))
    for side, ranks in results.items():
        for rank, marks in enumerate(ranks):
            other = f"{marks['other_ranks'] / GB:.2f}" if side == "reshard" else "-"
            row = [side, str(rank), f"{marks['bytes'] / GB:.2f}", other]
            row += [f"{marks['fetch']:.1f}", f"{marks['downloaded']:.1f}", f"{marks.get('ready', float('nan')):.1f}"]
            print("".join(f"{cell:>17}" for cell in row))
    ratio = sum(m["bytes"] for m in results["today"]) / max(1, sum(m["bytes"] for m in results["reshard"]))
    print(f"\nbytes downloaded, today / reshard: {ratio:.2f}x")


def _store_directly(folder: Path, bucket: str, prefix: str) -> None:
    """Put the checkpoint into the server's store without HTTP: setup for the baseline, not measured (moto is slow
    to assemble several 1 GB multipart uploads at once, enough for clients to time out on a loaded machine)."""
    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    backend = s3_backends[DEFAULT_ACCOUNT_ID]["aws"]
    for path in sorted(folder.iterdir()):
        if path.is_file():
            backend.put_object(bucket, f"{prefix}/{path.name}", path.read_bytes())


def _size(folder: Path) -> str:
    return f"{sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / GB:.2f}"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


if __name__ == "__main__":
    main()
