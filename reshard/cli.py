"""The ``reshard`` command line. ``reshard --tp 8 MODEL`` converts; subcommands verify, inspect and check.

Errors reshard raises on purpose print as one line (``reshard: error: ...``) with an exit code per kind;
``--debug`` anywhere on the line shows the traceback instead.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import sys
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from reshard.commands.default_group import DefaultToConvert
from reshard.manifests.errors import OutputError, ReshardError, ShardabilityError, SourceError
from reshard.request import FLAG, TRANSFORMERS_HELP, ConversionRequest

CONVERT_HELP = """Convert MODEL (a local folder or a Hub repo id) into one safetensors file per tp rank.

\b
  reshard --tp 8 HuggingFaceTB/SmolLM2-1.7B
  reshard --tp 4 ./my-checkpoint -o ./my-checkpoint-tp4 --plan auto
  reshard --tp 2 ./ckpt --plan my_plan.json
  reshard --tp 4 ./ckpt-tp8 -o ./ckpt-tp4          # re-shard an artifact: no source needed
  reshard --tp 8 ./ckpt --workers 2                 # split the work over 2 processes
  torchrun --nproc-per-node 4 -m reshard --tp 8 ./ckpt -o ./ckpt-tp8
  reshard --tp 8 --replicate-kv ./ckpt               # KV heads < tp: duplicate them
  reshard --tp 8 --dtype bfloat16 ./ckpt             # stored as the runtime will load it
  reshard --tp 4 --ep 4 ./qwen3-moe                  # expert parallel: whole experts per rank
  reshard --tp 8 ./ckpt --push-to s3://bucket/ckpt-tp8   # then publish it

The plan is `auto` (the plan transformers applies for the architecture) or rules of module
pattern -> style, as a JSON file or inline, e.g. {"model.layers.*.self_attn.q_proj": "colwise"}:
merged into the model's own plan as DistributedConfig(tp_plan=...) merges them. Plans and key conversions
are the installed transformers release's (see --transformers), recorded in the manifest. The artifact is
written into a hidden folder and renamed into place when complete; manifest.json records every
tensor's placement, slices and xxh3-128 hashes. Rerunning a killed conversion reuses the rank
files it had finished.
"""
_TRANSFORMERS = click.option("--transformers", "transformers_version", metavar="VERSION", help=TRANSFORMERS_HELP)


@click.group(cls=DefaultToConvert, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="reshard")
def cli() -> None:
    """Pre-shard Hugging Face checkpoints for tensor parallelism.

    \b
      reshard --tp 8 MODEL [-o OUT]     convert (same as `reshard convert`)
      reshard check --tp 8 MODEL        can MODEL be split 8 ways? (config.json only)
      reshard verify ARTIFACT           re-hash every file and tensor
      reshard inspect ARTIFACT          model, tp, plan, bytes per rank, tensors
      reshard --tp 4 ARTIFACT           re-shard an artifact to another tp (no source needed)
      reshard consolidate ARTIFACT -o D back to a Hugging Face checkpoint
      reshard publish ARTIFACT DEST     to a folder, hf://ORG/NAME, s3:// gs:// az://BUCKET/PREFIX

    Add --debug to any command for a full traceback on error.
    """


def request_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """The click options of every ``ConversionRequest`` field, made from the fields themselves (``Flag``): passed to
    the command under the fields' names."""
    hints = typing.get_type_hints(ConversionRequest)
    for f in reversed(dataclasses.fields(ConversionRequest)):
        if (flag := f.metadata.get(FLAG)) is None:
            continue
        kind: Any = None
        if flag.choices is not None:
            kind = click.Choice(flag.choices)
        elif hints[f.name] in (int, int | None):
            kind = click.IntRange(min=1)
        elif hints[f.name] is Path:
            kind = click.Path()
        default = None if f.default is dataclasses.MISSING else f.default
        shown = default is not None and not isinstance(default, bool)
        spelling: dict[str, Any] = (
            {"is_flag": True} if isinstance(default, bool) else {"default": default, "type": kind}
        )
        command = click.option(
            *flag.decls, f.name, help=flag.help, required=flag.required, metavar=flag.metavar, show_default=shown,
            **spelling,
        )(command)  # fmt: skip
    return command


@cli.command(help=CONVERT_HELP)
@click.argument("model")
@request_options
@click.option(
    "--push-to",
    default=None,
    metavar="DEST",
    help="Publish the artifact when done: a folder, a bucket (s3://, gs://, az://...) or hf://org/name (see publish).",
)
@click.option(
    "--worker", "worker_slot", default=None, hidden=True, help="INDEX/COUNT: one local worker's share (internal)."
)
def convert(model: str, push_to: str | None, worker_slot: str | None, **options: Any) -> None:
    from reshard.commands.convert import convert_part, default_output, run
    from reshard.workers import from_torchrun, solo

    if options["out"] is None:
        options["out"] = default_output(model, options["tp"], options["pp"], options["ep"], options["dtype"])
    request = ConversionRequest.from_flags(model, {**options, "out": Path(options["out"])})
    if worker_slot is not None:
        index, size = (int(part) for part in worker_slot.split("/"))
        convert_part(request, index, size)
        return
    manifest = run(request, from_torchrun() or solo())
    size = sum(f.size for f in manifest.files if f.rank is not None)
    mesh = ", ".join(f"{dim}={n}" for dim, n in manifest.mesh.items())
    out = str(options["out"])
    click.echo(f"wrote {out}: {len(manifest.tensors)} tensors, {mesh}, {size / 1e9:.2f} GB in rank files")
    if push_to and int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one worker publishes
        from reshard.commands.publish import publish

        click.echo(f"published {publish(out, push_to, progress=request.progress)}")


@cli.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def verify(artifact: str, quiet: bool) -> None:
    """Re-hash every file and tensor slice of ARTIFACT against its manifest.

    Exits non-zero, naming each file and tensor that is wrong, if anything differs.

    \b
      reshard verify ./my-checkpoint-tp4
    """
    from reshard.commands.verify import total_bytes, verify_artifact
    from reshard.manifests import read_manifest
    from reshard.manifests.errors import IntegrityError
    from reshard.manifests.progress import progress_bar

    manifest = read_manifest(artifact)
    with progress_bar(total=total_bytes(manifest), desc="verify", enabled=not quiet) as bar:
        problems = verify_artifact(artifact, bar.update)
    if problems:
        for problem in problems:
            click.echo(f"reshard: {artifact}/{problem}", err=True)
        raise IntegrityError(f"{artifact}: {len(problems)} problem(s) found")
    click.echo(f"{artifact}: OK ({len(manifest.files)} files, {len(manifest.tensors)} tensors verified)")


@cli.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def inspect(artifact: str, as_json: bool) -> None:
    """Show what ARTIFACT holds: model, tp, plan, bytes per rank and a tensor table.

    \b
      reshard inspect ./my-checkpoint-tp4 [--json]
    """
    from reshard.commands.inspect import render_text, summarize
    from reshard.manifests import read_manifest

    manifest = read_manifest(artifact)
    click.echo(json.dumps(summarize(manifest), indent=2) if as_json else render_text(manifest))


@cli.command()
@click.argument("model")
@click.option("--tp", "tps", type=click.IntRange(min=1), multiple=True, help="tp sizes to check [default: 1-16].")
@click.option(
    "--plan", default="auto", show_default=True, help="`auto`, or rules (JSON file or inline) merged into it."
)
@click.option("--revision", default=None, help="Hub revision when MODEL is a repo id.")
@click.option("--replicate-kv", is_flag=True, help="Judge tp as `reshard --replicate-kv` would (KV heads duplicated).")
@click.option("--pp", "pps", type=click.IntRange(min=1), multiple=True, help="Pipeline stage counts to check.")
@_TRANSFORMERS
def check(model: str, tps: tuple[int, ...], pps: tuple[int, ...], **options: Any) -> None:
    """Say whether MODEL can be split at each tp (and into each number of pipeline stages), from config.json and,
    for a local folder, whether transformers would load every parameter from it (headers only, no weights read).

    Exits non-zero if any requested tp or pp would not work (5), or the checkpoint would be refused (3).

    \b
      reshard check --tp 8 HuggingFaceTB/SmolLM2-1.7B
      reshard check --tp 2 --tp 3 --tp 4 ./ckpt
      reshard check --tp 4 --pp 2 ./ckpt     # which layers each stage holds
    """
    from reshard.commands.check import check_report

    sizes = tps or (() if pps else tuple(range(1, 17)))
    lines, failed = check_report(model, sizes, pps, **options)  # plan, revision, replicate_kv, transformers_version
    click.echo("\n".join(lines))
    if failed and (tps or pps or "load   NO" in lines):
        sys.exit(SourceError.exit_code if "load   NO" in lines else ShardabilityError.exit_code)


@cli.command()
@click.argument("artifact", type=click.Path(file_okay=False))
@click.option("-o", "--output", type=click.Path(), required=True, help="Checkpoint folder to write.")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest safetensors file, e.g. 2GB, 500MB.")
@click.option("--overwrite", is_flag=True, help="Replace the output folder if it exists.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def consolidate(artifact: str, output: str, max_shard_size: str, overwrite: bool, quiet: bool) -> None:
    """Turn ARTIFACT back into a Hugging Face checkpoint (sharded safetensors + index, config, tokenizer).

    Every tensor equals the original checkpoint's bit for bit, under its original name, and
    from_pretrained loads the folder.

    \b
      reshard consolidate ./SmolLM2-1.7B-tp8 -o ./SmolLM2-1.7B
    """
    from reshard.commands.consolidate import consolidate as run_consolidate

    run_consolidate(
        artifact, output, max_shard_bytes=parse_size(max_shard_size), overwrite=overwrite, progress=not quiet
    )
    click.echo(f"wrote {output}")


@cli.command()
@click.argument("artifact", type=click.Path(file_okay=False, exists=True))
@click.argument("destination")
@click.option("--token", default=None, help="Hub token for hf:// [default: the logged-in one].")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def publish(artifact: str, destination: str, token: str | None, quiet: bool) -> None:
    """Upload ARTIFACT to DESTINATION so that each rank can fetch only its own file.

    DESTINATION is a folder, hf://ORG/NAME[@REVISION] (one commit with a model card) or any fsspec
    URL: s3://BUCKET/PREFIX ('reshard[s3]'), gs:// ('reshard[gcs]'), az://CONTAINER/PREFIX
    ('reshard[azure]'), ...; endpoint and credentials come from the backend's usual settings. A
    trailing / puts the artifact under its folder name. The manifest goes last, and a rerun skips
    files already there with the same hash.

    \b
      reshard publish ./SmolLM2-1.7B-tp8 hf://my-org/SmolLM2-1.7B-tp8
      reshard publish ./SmolLM2-1.7B-tp8 s3://bucket/models/SmolLM2-1.7B-tp8
      reshard publish ./SmolLM2-1.7B-tp8 gs://bucket/models/
      reshard publish ./SmolLM2-1.7B-tp8 /mnt/shared/models/
    """
    from reshard.commands.publish import publish as run_publish

    click.echo(f"published {run_publish(artifact, destination, progress=not quiet, token=token)}")


def parse_size(text: str) -> int:
    """``"5GB"`` → 5_000_000_000 (decimal units, like save_pretrained's max_shard_size)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "B": 1}
    cleaned = text.strip().upper()
    for unit, factor in units.items():
        if cleaned.endswith(unit) and cleaned[: -len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(cleaned[: -len(unit)]) * factor)
    if cleaned.isdigit():
        return int(cleaned)
    raise click.BadParameter(f"{text!r} is not a size such as 5GB or 500MB", param_hint="--max-shard-size")


def main(argv: list[str] | None = None) -> Any:
    """Entry point: run the CLI, turning ReshardError into a one-line message and its exit code.

    Any other ``OSError`` (a read-only file system, no space, no permission while writing the output) is one line
    with ``OutputError``'s exit code, never a traceback. SIGTERM is an interruption like Ctrl-C: a conversion keeps
    its staging folder, and the message says the same command resumes.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    previous = _terminate_as_interrupt()
    try:
        return cli.main(args=args, prog_name="reshard", standalone_mode=False)
    except ReshardError as exc:
        if debug:
            raise
        click.echo(f"reshard: error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:
        if debug:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        click.echo(f"reshard: error: {where}cannot write ({exc.strerror or exc})", err=True)
        sys.exit(OutputError.exit_code)
    except click.exceptions.Abort as exc:  # click turns Ctrl-C (and SIGTERM, see below) into Abort
        interrupt = exc.__context__ if isinstance(exc.__context__, KeyboardInterrupt) else None
        _interrupted(interrupt) if interrupt is not None else click.echo("reshard: aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt as exc:
        _interrupted(exc)
        sys.exit(130)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupted(exc: KeyboardInterrupt) -> None:
    """One line: what an interruption kept (a conversion notes its staging folder and that it resumes)."""
    notes = getattr(exc, "__notes__", None)
    click.echo(f"reshard: interrupted; {'; '.join(notes) if notes else 'no output was left behind'}", err=True)


def _terminate_as_interrupt() -> Any:
    """Make SIGTERM raise ``KeyboardInterrupt`` in the main thread (so cleanup and the message run); returns the
    previous handler, or None where it cannot be set (not the main thread)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, interrupt)
    except ValueError:
        return None
