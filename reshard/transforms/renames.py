"""Key renames: transformers renames some checkpoint keys at load (gpt_neox's ``embed_out.`` → ``lm_head.``), so
rank files hold the names of the model's parameters; consolidation gives the checkpoint's names back."""

from __future__ import annotations

import dataclasses

from reshard.manifests.transforms import RenameRules as Rules
from reshard.manifests.transforms import checkpoint_key, model_key
from reshard.planning.tp_plan import generic_name
from reshard.transforms import Table


def forward(table: Table, rules: Rules, parameters: tuple[str, ...] = ()) -> Table:
    """Checkpoint names → model names. A key the model already has keeps its name when a rename would turn it into
    a name the model does not have (transformers' loader does the same: gpt-style ``\\.norm\\.`` rules meant for
    inner norms leave ``model.norm`` alone); ``parameters`` are the model's names, layer numbers as ``*``."""
    known = set(parameters)

    def rename(name: str) -> str:
        renamed = model_key(name, rules)
        if known and generic_name(renamed) not in known and generic_name(name) in known:
            return name
        return renamed

    return _renamed(table, rename)


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
