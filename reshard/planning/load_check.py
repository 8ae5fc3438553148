"""The checkpoint's tensors, after reshard's conversions, against the model's keys, by transformers' own rules: the
load report, and the refusals where transformers would load a model with random weights or a wrong shape.

Pure: ``check_load`` decides from names, shapes and the model's keys; the caller says whether a tied pair holds
the same bytes (``same_bytes``) and raises ``problems[0]``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

from reshard.manifests.load_report import LoadReport, UnusedTensor
from reshard.planning.model_keys import ModelKeys
from reshard.planning.tp_plan import generic_name

Shapes = dict[str, tuple[str, tuple[int, ...]]]  # name -> (safetensors dtype, shape)


@dataclass
class LoadCheck:
    """The report, what is refused (``problems``, first one first) and which tensors the model does not use."""

    report: LoadReport
    problems: list[str] = field(default_factory=list)

    @property
    def unused(self) -> set[str]:
        return {u.name for u in self.report.unused}


def check_load(
    tensors: Shapes,
    keys: ModelKeys,
    *,
    allow_missing: bool = False,
    same_bytes: Callable[[str, str], bool | None] = lambda a, b: None,
    model_type: str | None = None,
) -> LoadCheck:
    """Compare the converted checkpoint's tensors with the model's keys as ``from_pretrained`` does.

    Refused (``problems``): a shape other than the model's (a q_proj at half size from a missing shard); a decoder
    layer at or beyond ``num_hidden_layers`` the config does not declare (``num_nextn_predict_layers``) nor the
    model ignores; a parameter neither the checkpoint, tying nor the model's ignore rules fill (unless
    ``allow_missing``: then recorded as transformers would load it, at random). ``same_bytes(a, b)`` says whether
    two tensors hold the same bytes (``None``: unknown): a tied checkpoint that also stores ``lm_head`` equal to the
    embeddings stores a copy transformers ties away.
    """
    problems: list[str] = []
    unused: list[UnusedTensor] = []
    ignore_unexpected = re.compile(keys.ignore_unexpected) if keys.ignore_unexpected else None
    used = set()
    for name, (dtype, shape) in sorted(tensors.items()):
        if _known(name, keys):
            expected = keys.shapes.get(name) if keys.shapes is not None else None
            if expected is not None and tuple(shape) != tuple(expected):
                problems.append(
                    f"{name}: the checkpoint has shape {list(shape)}, the model config.json describes has "
                    f"{list(expected)} (a missing or truncated shard, or a config of another size)"
                )
            used.add(name)
            continue
        layer = _layer(name, keys.decoder)
        ignored = ignore_unexpected is not None and ignore_unexpected.search(name) is not None
        if layer is not None and layer >= keys.layers and not ignored:
            if layer >= keys.layers + keys.declared_layers:
                problems.append(
                    f"{name}: layer {layer}, but config.json has num_hidden_layers={keys.layers} and declares "
                    f"{keys.declared_layers} more (num_nextn_predict_layers): a checkpoint of a deeper model?"
                )
            unused.append(UnusedTensor(name, dtype, tuple(shape), "extra_layer"))
            continue
        if keys.shapes is None:  # names only (the plan's, from a default config): not enough to leave a tensor out
            used.add(name)
            continue
        unused.append(UnusedTensor(name, dtype, tuple(shape), "ignored" if ignored else "unexpected"))
    tied: list[str] = []
    for target, source in sorted(keys.tied.items()):
        if target in used and source in used and same_bytes(target, source):
            used.discard(target)  # transformers ties equal copies: the model's lm_head is the embeddings
            dtype, shape = tensors[target]
            unused.append(UnusedTensor(target, dtype, tuple(shape), "tied_copy"))
            tied.append(target)
        elif target not in used and source in used:
            tied.append(target)
        elif source not in used and target in used:
            tied.append(source)  # transformers swaps a pair whose source is missing
    expected_names = _expected(keys, used)
    missing = sorted(expected_names - used - set(tied))
    ignore_missing = re.compile(keys.ignore_missing) if keys.ignore_missing else None
    ignored_missing = [name for name in missing if ignore_missing is not None and ignore_missing.search(name)]
    missing = [name for name in missing if name not in ignored_missing]
    if missing and not allow_missing:
        problems.append(_missing_line(missing, [u.name for u in unused], model_type))
    report = LoadReport(
        keys.checked_against,
        tuple(missing),
        tuple(sorted(tied)),
        tuple(ignored_missing),
        tuple(sorted(unused, key=lambda u: u.name)),
    )
    return LoadCheck(report, problems)


def _known(name: str, keys: ModelKeys) -> bool:
    if keys.shapes is not None:
        return name in keys.shapes
    return generic_name(name) in keys.patterns


def _expected(keys: ModelKeys, used: set[str]) -> set[str]:
    """The model's keys; with names only, each pattern with no instance in the checkpoint stands for itself (the
    layers of a hybrid model differ, so a pattern is only known to be wanted somewhere)."""
    if keys.shapes is not None:
        return set(keys.shapes)
    present = {generic_name(name) for name in used}
    return {pattern for pattern in keys.patterns if pattern not in present} | used


def _layer(name: str, decoder: str) -> int | None:
    head = f"{decoder}layers."
    if not name.startswith(head):
        return None
    index = name[len(head) :].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def _missing_line(missing: list[str], unexpected: list[str], model_type: str | None) -> str:
    """One line: the first missing parameters and the likely cause, from the names the checkpoint has instead."""
    first = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
    head = f"{len(missing)} parameter(s) of the model are not in the checkpoint (initialised at random): {first}"
    cause = _likely_cause(missing, unexpected, model_type)
    return f"{head}; {cause} (--allow-missing converts anyway, as transformers would load it)"


def _likely_cause(missing: list[str], unexpected: list[str], model_type: str | None) -> str:
    """A prefix the checkpoint's keys carry instead of the model's (a base-model or multimodal checkpoint), a
    sub-model, or another model type."""
    by_suffix: dict[str, str] = {}
    for name in unexpected:
        parts = name.split(".")
        for cut in range(len(parts) - 1):
            by_suffix.setdefault(".".join(parts[cut:]), ".".join(parts[:cut]))
    for name in missing:
        parts = name.split(".")
        for cut in range(len(parts) - 1):
            suffix = ".".join(parts[cut:])
            if suffix in by_suffix:
                theirs, ours = by_suffix[suffix], ".".join(parts[:cut])
                found = f"the checkpoint has {(theirs + '.' if theirs else '') + suffix!r} instead"
                if not theirs:
                    return f"{found}: its keys lack the model's prefix {ours + '.'!r} (a base-model checkpoint?)"
                if not ours:
                    return f"{found}: its keys carry a prefix {theirs + '.'!r} the model lacks (a composite model's?)"
                return (
                    f"{found}: its keys carry the prefix {theirs + '.'!r} where the model has {ours + '.'!r} "
                    "(a composite or multimodal checkpoint?)"
                )
    if missing == ["lm_head.weight"]:
        return "the checkpoint has no output head: saved from the base model (AutoModel), without lm_head?"
    if unexpected:
        return (
            f"the checkpoint's other tensors ({unexpected[0]}, ...) are not the model's: a checkpoint of another "
            f"model type than config.json's {model_type!r}, or of a sub-model?"
        )
    return f"the checkpoint lacks them: an incomplete checkpoint, or another model type than {model_type!r}?"
