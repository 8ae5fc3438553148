"""Key renames: transformers renames some checkpoint keys at load (gpt_neox's ``embed_out.`` → ``lm_head.``), so
rank files hold the names of the model's parameters; consolidation gives the checkpoint's names back."""

from __future__ import annotations

import dataclasses

from reshard.manifests.transforms import RenameRules as Rules
from reshard.manifests.transforms import checkpoint_key, model_key
from reshard.transforms import Table


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
