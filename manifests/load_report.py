"""The load report: what the checkpoint's tensors are to the model transformers builds, checked at conversion.

transformers' ``from_pretrained`` compares the checkpoint's keys (after its load-time conversions) with the model's
parameters and persistent buffers: a parameter the checkpoint lacks is initialised at random and reported MISSING
(unless tying fills it or the model's ``_keys_to_ignore_on_load_missing`` names it), a key the model lacks is
reported UNEXPECTED and ignored, a wrong shape MISMATCHED. reshard makes the same comparison before it writes a byte
and refuses what transformers would only log; what it lets through is recorded here. Tensors the model does not use
(an old ``rotary_emb.inv_freq``, a vision tower, declared multi-token-prediction layers, a tied checkpoint's copy of
``lm_head``) are kept once, whole, in a file of their own (``unused_file``) that no rank loads, so that
consolidation still returns the checkpoint bit for bit.

Example:
    >>> LoadReport("LlamaForCausalLM (transformers 5.23.0)").to_json()["missing"]
    []
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from reshard.manifests.dtypes import DTYPES

if TYPE_CHECKING:
    from reshard.manifests.typed_json import Fields

UNUSED_FILE = "unused.safetensors"

# Why the model does not use a tensor (each: transformers ignores it at load).
UNUSED_REASONS = {
    "unexpected": "the model has no such parameter (transformers: UNEXPECTED, ignored)",
    "ignored": "the model's _keys_to_ignore_on_load_unexpected (or transformers' own rules) names it",
    "extra_layer": "a layer beyond num_hidden_layers that the config declares (num_nextn_predict_layers)",
    "tied_copy": "lm_head.weight equal to the embeddings it is tied to (transformers ties them)",
}
_FIELDS = ("checked_against", "missing", "tied", "ignored_missing", "unused", "unused_file")


@dataclass(frozen=True)
class UnusedTensor:
    """A tensor of the checkpoint the model does not load, under its name after the conversions."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape), "reason": self.reason}


@dataclass(frozen=True)
class LoadReport:
    """The comparison of the checkpoint with the model, as recorded in the manifest.

    ``checked_against`` says what the tensors were compared with (a class built by transformers, or only the
    built-in plan's names when transformers was not installed); ``missing`` are parameters left at random
    (only with ``--allow-missing``); ``tied`` those tying fills; ``ignored_missing`` those the model's own
    ``_keys_to_ignore_on_load_missing`` names; ``unused`` the tensors kept out of the rank files, stored whole
    in ``unused_file`` (``None``: left out of the artifact).
    """

    checked_against: str
    missing: tuple[str, ...] = ()
    tied: tuple[str, ...] = ()
    ignored_missing: tuple[str, ...] = ()
    unused: tuple[UnusedTensor, ...] = ()
    unused_file: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "checked_against": self.checked_against,
            "missing": list(self.missing),
            "tied": list(self.tied),
            "ignored_missing": list(self.ignored_missing),
            "unused": [u.to_json() for u in self.unused],
            "unused_file": self.unused_file,
        }

    def summary(self) -> list[str]:
        """Human-readable lines (``reshard inspect``, ``reshard check``)."""
        lines = [f"checked against {self.checked_against}"]
        if self.missing:
            lines.append(f"MISSING (initialised at random): {len(self.missing)}: {', '.join(self.missing[:5])}")
        if self.tied:
            lines.append(f"tied (filled by tying): {', '.join(self.tied)}")
        if self.ignored_missing:
            lines.append(f"missing, ignored by the model's own rules: {', '.join(self.ignored_missing[:5])}")
        where = f"not loaded, kept in {self.unused_file}" if self.unused_file else "not loaded"
        for reason in UNUSED_REASONS:
            names = [u.name for u in self.unused if u.reason == reason]
            if names:
                shown = ", ".join(names[:3]) + (f", ... ({len(names)})" if len(names) > 3 else "")
                lines.append(f"unused ({reason}, {where}): {shown}")
        return lines


def parse_load_report(f: Fields, value: Any) -> LoadReport | None:
    """The typed report of a manifest's raw ``load_report`` (absent or null in manifests written before it)."""
    if value is None:
        return None
    data = f.obj(value, "load_report")
    if unknown := sorted(set(data) - set(_FIELDS)):
        f.fail(f"load_report.{unknown[0]}", "unknown field")

    def names(key: str) -> tuple[str, ...]:
        items = f.array(data.get(key, []), f"load_report.{key}")
        return tuple(f.string(item, f"load_report.{key}[{i}]") for i, item in enumerate(items))

    unused = []
    for i, item in enumerate(f.array(data.get("unused", []), "load_report.unused")):
        path = f"load_report.unused[{i}]"
        entry = f.obj(item, path)
        if unknown := sorted(set(entry) - {"name", "dtype", "shape", "reason"}):
            f.fail(f"{path}.{unknown[0]}", "unknown field")
        dtype = f.string(f.req(entry, "dtype", path), f"{path}.dtype")
        if dtype not in DTYPES:
            f.fail(f"{path}.dtype", f"unknown dtype {dtype!r}")
        dims = f.array(f.req(entry, "shape", path), f"{path}.shape", 16)
        shape = tuple(f.integer(d, f"{path}.shape[{k}]") for k, d in enumerate(dims))
        bits = math.prod(shape) * DTYPES[dtype].bits
        if bits % 8:
            f.fail(f"{path}.shape", f"{list(shape)} of {dtype} is {bits} bits, not a whole number of bytes")
        if bits // 8 > 2**62:
            f.fail(f"{path}.shape", "too many bytes")
        reason = f.string(f.req(entry, "reason", path), f"{path}.reason")
        if reason not in UNUSED_REASONS:
            f.expected(f"{path}.reason", " or ".join(UNUSED_REASONS), reason)
        unused.append(UnusedTensor(f.string(f.req(entry, "name", path), f"{path}.name"), dtype, shape, reason))
    return LoadReport(
        checked_against=f.string(f.req(data, "checked_against", "load_report"), "load_report.checked_against"),
        missing=names("missing"),
        tied=names("tied"),
        ignored_missing=names("ignored_missing"),
        unused=tuple(unused),
        unused_file=f.opt(data.get("unused_file"), "load_report.unused_file", f.string),
    )


def load_report_problem(report: LoadReport, tensors: set[str], other_files: set[str]) -> tuple[str, str] | None:
    """What makes a typed report inconsistent with its manifest, as (JSON path, message), or ``None``.

    An unused tensor must not also be a rank file's tensor (the runtime would load it), must be listed once, and
    its file must be ``unused.safetensors``, one of the artifact's non-rank files (the runtime skips it, so no
    other file may be named); unused tensors without a file are allowed (left out). A missing parameter is not
    one of the tensors."""
    for i, name in enumerate(report.missing):
        if name in tensors:
            return f"load_report.missing[{i}]", f"{name!r} is a tensor of the rank files, not missing"
    seen: set[str] = set()
    for i, unused in enumerate(report.unused):
        if unused.name in tensors:
            return f"load_report.unused[{i}].name", f"{unused.name!r} is also a tensor of the rank files"
        if unused.name in seen:
            return f"load_report.unused[{i}].name", f"{unused.name!r} is listed twice"
        seen.add(unused.name)
    if report.unused_file is not None:
        if report.unused_file != UNUSED_FILE:
            return "load_report.unused_file", f"{report.unused_file!r}: the unused tensors' file is {UNUSED_FILE!r}"
        if report.unused_file not in other_files:
            return "load_report.unused_file", f"{report.unused_file!r} is not one of the artifact's other files"
        if not report.unused:
            return "load_report.unused_file", "names a file, but no tensor is unused"
    return None
