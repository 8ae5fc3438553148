"""Transforms of a checkpoint's tensors, each written once with its reverse beside it.

A transform changes a tensor table (``{name: StoredTensor}``: names, shapes and chunk lists, never bytes). Its
forward half turns the checkpoint's tensors into the model's (used by convert and re-shard), its reverse half gives
the checkpoint's back (used by consolidate and re-shard), and what it did is recorded in the manifest as a typed
record (``reshard.manifests.transforms``). Forward order: ``renames`` (with a ``PrefixChange`` that removes a
prefix, and inkling2's index-shifting one as literal rules), ``row_blocks`` (dim-0 ``Concatenate``/``Chunk``),
``interleave`` (``Interleave``: gate/up rows de-interleaved per rank block), ``experts``, ``kv_heads``; reverse order is
the opposite.
A new converter kind is one new module here with the same two halves; ``converters.replayable`` says which kinds
there are.
"""

from __future__ import annotations

from reshard.manifests.chunks import StoredTensor

Table = dict[str, StoredTensor]
