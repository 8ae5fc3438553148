"""Fused experts: replay transformers' load-time weight converters without building the fused tensors.

Hub MoE checkpoints store one tensor per expert (``mlp.experts.3.gate_proj.weight``); transformers 5.x stacks them
at load (``MergeModulelist(dim=0)``) and concatenates gate and up (``Concatenate(dim=1)``) into
``mlp.experts.gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]``, and shards those. In row-major order a fused
tensor is just its pieces one after another (gate_0, up_0, gate_1, up_1, ...), so reshard describes it as a list
of byte segments and streams each rank's slice from the per-expert tensors directly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reshard.errors import PlanError, SourceError
from reshard.loaders.safetensors_file import HeaderEntry
from reshard.readers import Segment

SUPPORTED_OPERATIONS = ({"MergeModulelist"}, {"MergeModulelist", "Concatenate"})


@dataclass(frozen=True)
class FusedTensor:
    """A tensor transformers builds at load from several checkpoint tensors, as the segments that compose it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    segments: list[Segment]
    sources: list[str]  # checkpoint names in fused order (expert-major, then part)


def _pattern(source: str) -> re.Pattern[str]:
    """``mlp.experts.*.gate_proj.weight`` → a regex capturing the expert index (``*`` is a number)."""
    return re.compile(re.escape(source).replace(r"\*", r"(\d+)") + "$")


def fuse_experts(
    tensors: dict[str, tuple[Path, HeaderEntry]], converters: list[dict[str, Any]]
) -> tuple[dict[str, tuple[Path, HeaderEntry]], dict[str, FusedTensor]]:
    """Split ``tensors`` into those kept as they are and the fused tensors the converters make of the rest."""
    remaining = dict(tensors)
    fused: dict[str, FusedTensor] = {}
    for converter in converters:
        sources, targets = converter["sources"], converter["targets"]
        operations = {name for name, _ in converter["operations"]}
        patterns = [_pattern(s) for s in sources]
        groups: dict[str, dict[int, dict[int, str]]] = {}  # prefix -> expert -> part -> checkpoint name
        for name in list(remaining):
            for part, pattern in enumerate(patterns):
                match = pattern.search(name)
                if match:
                    prefix = name[: match.start()]
                    groups.setdefault(prefix, {}).setdefault(int(match.group(1)), {})[part] = name
        if not groups:
            continue
        if operations not in SUPPORTED_OPERATIONS or len(targets) != 1 or converter.get("kind") != "WeightConverter":
            example = next(iter(next(iter(groups.values())).values()))[0]
            raise PlanError(f"tensor {example!r}: reshard cannot replay transformers' converter {converter}")
        for prefix, experts in sorted(groups.items()):
            target = prefix + targets[0]
            fused[target] = _fuse(target, experts, len(sources), remaining)
            for parts in experts.values():
                for name in parts.values():
                    del remaining[name]
    return remaining, fused


def _fuse(
    target: str, experts: dict[int, dict[int, str]], parts: int, tensors: dict[str, tuple[Path, HeaderEntry]]
) -> FusedTensor:
    if sorted(experts) != list(range(len(experts))):
        raise SourceError(f"{target}: expert indices {sorted(experts)} are not 0..{len(experts) - 1}")
    names: list[str] = []
    for index in range(len(experts)):
        if sorted(experts[index]) != list(range(parts)):
            raise SourceError(f"{target}: expert {index} lacks some of its {parts} parts")
        names.extend(experts[index][part] for part in range(parts))
    entries = [tensors[name][1] for name in names]
    first = entries[0]
    for name, entry in zip(names, entries, strict=True):
        if entry.dtype != first.dtype or entry.shape[1:] != first.shape[1:] or len(entry.shape) != len(first.shape):
            raise SourceError(f"{tensors[name][0]}: tensor {name!r} does not match the shape/dtype of {names[0]!r}")
    rows = sum(entries[part].shape[0] for part in range(parts))
    for index in range(len(experts)):
        expert_rows = sum(entries[index * parts + part].shape[0] for part in range(parts))
        if expert_rows != rows:
            raise SourceError(f"{target}: expert {index} has {expert_rows} rows, expert 0 has {rows}")
    shape = (len(experts), rows, *first.shape[1:])
    segments = [Segment(tensors[n][0], e.offset, e.nbytes, n) for n, e in zip(names, entries, strict=True)]
    return FusedTensor(target, first.dtype, shape, segments, names)
