"""Key renames: transformers renames some checkpoint keys at load (gpt_neox's ``embed_out.`` → ``lm_head.``), so
rank files hold the names of the model's parameters; consolidation gives the checkpoint's names back."""

from __future__ import annotations

import dataclasses
import re

from reshard.manifests.errors import ReshardError
from reshard.transforms import Table

Rules = tuple[tuple[str, str], ...]
_LITERAL_PATTERN = re.compile(r"\^?(?:\w|\\\.|\.)+")


def model_key(checkpoint_key: str, rules: Rules) -> str:
    """The model parameter name of a checkpoint key, after transformers' renames (regex, replacement) in order."""
    for pattern, target in rules:
        checkpoint_key = re.sub(pattern, target, checkpoint_key)
    return checkpoint_key


def checkpoint_key(model_key: str, rules: Rules) -> str:
    """Undo the renames, last first; only literal patterns (``^embed_out\\.``) can be undone."""
    for pattern, target in reversed(rules):
        if not _LITERAL_PATTERN.fullmatch(pattern):
            raise ReshardError(f"cannot undo the key rename {pattern!r} -> {target!r} (not a literal pattern)")
        anchored = pattern.startswith("^")
        literal = pattern.removeprefix("^").replace("\\.", ".")
        model_key = re.sub(("^" if anchored else "") + re.escape(target), literal.replace("\\", "\\\\"), model_key)
    return model_key


def forward(table: Table, rules: Rules) -> Table:
    """Checkpoint names → model names."""
    return _renamed(table, lambda name: model_key(name, rules))


def reverse(table: Table, rules: Rules) -> Table:
    """Model names → checkpoint names."""
    return _renamed(table, lambda name: checkpoint_key(name, rules))


def _renamed(table: Table, rename: object) -> Table:
    assert callable(rename)
    out: Table = {}
    for name, tensor in table.items():
        new = rename(name)
        out[new] = dataclasses.replace(tensor, name=new)
    return out
