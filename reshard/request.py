"""What the user asked for: every option of a conversion, carried unchanged from the CLI (or ``reshard.convert``)
to the plan and to every worker process. A new option is one field here and one in the CLI."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from reshard.manifests.dtypes import STORED_DTYPES
from reshard.manifests.errors import ReshardError

__all__ = ["STORED_DTYPES", "ConversionRequest"]  # STORED_DTYPES: the ``--dtype`` choices, from the dtype table


@dataclass(frozen=True)
class ConversionRequest:
    """One conversion (or re-shard): source, output and options.

    ``plan`` is ``"auto"``, a JSON plan file's path, or a plan dict; ``workers`` local processes split the rank
    files; ``durable=False`` leaves the rank files in the page cache (no fsync); ``dtype`` (a ``STORED_DTYPES``
    name) stores floating tensors in the dtype the runtime will use, so that loading them stays zero-copy.
    """

    source: str
    out: Path
    tp: int
    plan: str | dict[str, str] = "auto"
    revision: str | None = None
    replicate_kv: bool = False
    ep: int = 1
    overwrite: bool = False
    progress: bool = True
    workers: int = 1
    durable: bool = True
    dtype: str = "auto"
    pp: int | None = None  # pipeline stages; ``None``: 1 for a checkpoint, an artifact's own when re-sharding
    transformers: str | None = None  # the release whose plans it follows; ``None``: the installed one
    allow_missing: bool = False  # convert although parameters would be initialised at random (as transformers)
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

    def worker_argv(self, index: int, size: int) -> list[str]:
        """The ``reshard`` command line that makes local worker ``index`` of ``size`` write its share of the ranks
        (the CLI parses it back into this same request)."""
        plan = self.plan if isinstance(self.plan, str) else json.dumps(self.plan, sort_keys=True)
        argv = [self.source, "--tp", str(self.tp), "-o", str(self.out), "--plan", plan, "--ep", str(self.ep)]
        argv += ["--revision", self.revision] if self.revision else []
        argv += ["--replicate-kv"] if self.replicate_kv else []
        argv += [] if self.durable else ["--no-fsync"]
        argv += [] if self.dtype == "auto" else ["--dtype", self.dtype]
        argv += [] if self.pp is None else ["--pp", str(self.pp)]
        argv += [] if self.transformers is None else ["--transformers", self.transformers]
        argv += ["--allow-missing"] if self.allow_missing else []
        return ["convert", *argv, "--worker", f"{index}/{size}", "--quiet"]
