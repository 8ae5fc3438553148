"""What the user asked for: every option of a conversion, carried unchanged from the CLI (or ``reshard.convert``)
to the plan and to every worker process.

Each option is defined once, as a field of ``ConversionRequest`` whose ``Flag`` says how the command line spells it:
the CLI's options are made from the fields (``cli.request_options``) and parsed back into them, and a worker's
command line is written from them (``worker_argv``). A new option is one field here, and a parameter of
``reshard.convert`` (a test checks that it has every field).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reshard.manifests.dtypes import STORED_DTYPES
from reshard.manifests.errors import ReshardError

__all__ = ["STORED_DTYPES", "ConversionRequest"]  # STORED_DTYPES: the ``--dtype`` choices, from the dtype table

FLAG = "reshard.flag"  # the key of a field's ``Flag`` in its metadata

TRANSFORMERS_HELP = """The transformers release whose built-in plans and load-time key conversions to follow
[default: the installed one; without transformers, the newest one reshard has plans for]."""


@dataclass(frozen=True)
class Flag:
    """How a request field is spelled on the command line: click's declarations and help text; ``inverse`` for a
    flag that turns the field off (``--no-fsync``: ``durable=False``); ``to_workers=False`` for what the processes
    ``--workers`` starts do not take (they always run quiet, into the parent's staging folder)."""

    decls: tuple[str, ...]
    help: str
    choices: tuple[str, ...] | None = None
    inverse: bool = False
    to_workers: bool = True
    required: bool = False
    metavar: str | None = None

    @property
    def name(self) -> str:
        """The long option (``--output`` of ``-o, --output``)."""
        return self.decls[-1]

    def argv(self, value: Any, default: Any) -> list[str]:
        """The arguments that give the field ``value`` (none for its default)."""
        if isinstance(value, bool):
            return [self.name] if value != self.inverse else []
        if value is None or value == default:
            return []
        text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else str(value)
        return [self.name, text]


def flag(*decls: str, help: str, **spelling: Any) -> dict[str, Flag]:
    """A request field's metadata: its command-line spelling (``Flag``)."""
    return {FLAG: Flag(decls, help, **spelling)}


@dataclass(frozen=True)
class ConversionRequest:
    """One conversion (or re-shard): source, output and options.

    ``plan`` is ``"auto"``, a JSON plan file's path, or a plan dict; ``workers`` local processes split the rank
    files; ``durable=False`` leaves the rank files in the page cache (no fsync); ``dtype`` (a ``STORED_DTYPES``
    name) stores floating tensors in the dtype the runtime will use, so that loading them stays zero-copy.
    """

    source: str
    out: Path = field(
        metadata=flag(
            "-o", "--output", help="Artifact folder [default: ./NAME-tpN, then -ppP, -epE, -DTYPE when given]."
        )
    )
    tp: int = field(metadata=flag("--tp", help="Tensor-parallel size (number of rank files).", required=True))
    plan: str | dict[str, str] = field(
        default="auto", metadata=flag("--plan", help="`auto`, or rules (JSON file or inline) merged into it.")
    )
    revision: str | None = field(
        default=None, metadata=flag("--revision", help="Hub revision (branch, tag or commit) when MODEL is a repo id.")
    )
    replicate_kv: bool = field(
        default=False,
        metadata=flag(
            "--replicate-kv", help="When tp exceeds the KV heads, duplicate them so each rank holds whole heads."
        ),
    )
    ep: int = field(
        default=1,
        metadata=flag(
            "--ep", help="Expert-parallel size (= tp): each rank holds whole experts (MoE models with an EP plan)."
        ),
    )
    overwrite: bool = field(
        default=False, metadata=flag("--overwrite", help="Replace the output folder if it exists.", to_workers=False)
    )
    progress: bool = field(
        default=True, metadata=flag("-q", "--quiet", help="No progress bars.", inverse=True, to_workers=False)
    )
    workers: int = field(
        default=1,
        metadata=flag(
            "--workers",
            help="Local processes to split the rank files over (under torchrun, every torchrun process is a worker).",
            to_workers=False,
        ),
    )
    durable: bool = field(
        default=True,
        metadata=flag(
            "--no-fsync",
            help="Leave the rank files in the page cache instead of flushing them to disk (about the speed of cp -r). "
            "Interrupting reshard stays safe; an OS crash or power cut soon after can leave an artifact whose files "
            "are incomplete (`reshard verify` finds it).",
            inverse=True,
        ),
    )
    dtype: str = field(
        default="auto",
        metadata=flag(
            "--dtype",
            help="Store floating tensors in this dtype (cast like torch's .to), the one the runtime will load them "
            "in, so that loading stays zero-copy. `auto` keeps each tensor's dtype (the runtime builds the model in "
            "config.json's dtype, as transformers does, casting what is stored otherwise).",
            choices=tuple(STORED_DTYPES),
        ),
    )
    pp: int | None = field(  # ``None``: 1 for a checkpoint, an artifact's own when re-sharding
        default=None,
        metadata=flag(
            "--pp",
            help="Pipeline stages, split as transformers' DistributedConfig(pp_size=N) splits the layers; each stage's "
            "tp rank files hold only its layers (pp x tp files) [default: 1; an artifact's own when re-sharding].",
        ),
    )
    transformers: str | None = field(  # ``None``: the installed release
        default=None, metadata=flag("--transformers", help=TRANSFORMERS_HELP, metavar="VERSION")
    )
    allow_missing: bool = field(  # convert although parameters would be initialised at random (as transformers)
        default=False, metadata=flag("--allow-missing", help="Convert even if some parameters would load at random.")
    )
    custom_plan: bool = field(init=False)

    def __post_init__(self) -> None:
        if not isinstance(self.tp, int) or isinstance(self.tp, bool) or self.tp < 1:
            raise ReshardError(f"tp must be a positive integer, got {self.tp!r}")
        if not isinstance(self.ep, int) or isinstance(self.ep, bool) or self.ep < 1:
            raise ReshardError(f"ep must be a positive integer, got {self.ep!r}")
        if self.pp is not None and (not isinstance(self.pp, int) or isinstance(self.pp, bool) or self.pp < 1):
            raise ReshardError(f"pp must be a positive integer, got {self.pp!r}")
        if self.dtype not in STORED_DTYPES:
            raise ReshardError(f"dtype must be one of {', '.join(STORED_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "custom_plan", self.plan != "auto")

    @classmethod
    def flags(cls) -> dict[str, Flag]:
        """Every option's command-line spelling, by field name, in field order."""
        return {f.name: f.metadata[FLAG] for f in dataclasses.fields(cls) if FLAG in f.metadata}

    @classmethod
    def from_flags(cls, source: str, values: dict[str, Any]) -> ConversionRequest:
        """The request the parsed command line gives: ``values`` by field name, as click passes them (an inverse
        flag's value is whether it was given)."""
        flags = cls.flags()
        fields: dict[str, Any] = {name: (not v) if flags[name].inverse else v for name, v in values.items()}
        return cls(source, **fields)

    def worker_argv(self, index: int, size: int) -> list[str]:
        """The ``reshard`` command line that makes local worker ``index`` of ``size`` write its share of the ranks
        (the CLI parses it back into this same request, but for what workers do not take)."""
        argv = [self.source]
        for f in dataclasses.fields(self):
            if (flag := f.metadata.get(FLAG)) is not None and flag.to_workers:
                argv += flag.argv(getattr(self, f.name), f.default)
        return ["convert", *argv, "--worker", f"{index}/{size}", "--quiet"]
