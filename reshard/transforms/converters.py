"""Which of transformers' load-time weight converters reshard replays offline: those a transform of the chain replays.

``experts`` replays the per-expert ones (``MergeModulelist``, with ``Concatenate(dim=1)`` of gate and up);
``row_blocks`` the dim-0 ``Concatenate`` and ``Chunk`` of whole tensors; ``interleave`` an ``Interleave``; ``renames``
the renamings (``PrefixChange`` and inkling2's index-shifting one included, replayed by ``keymap``). Any other
converter (an ``Interleave`` inverse, a transpose, ...) makes a model type unsupported: the architectures table and
the model-type matrix ask here, and a conversion that meets one refuses it with one line
(``planning.conversions.refuse_unreplayed``).
"""

from __future__ import annotations

from reshard.manifests.plans import ConverterRecord
from reshard.transforms.chain import CHAIN


def replayable(converter: ConverterRecord) -> bool:
    """Whether a converter is one a transform of the chain replays.

    Example:
        >>> replayable(ConverterRecord("WeightConverter", ("gate_up.weight",), ("gate.weight", "up.weight"),
        ...                            (("Chunk", {"dim": 0}),)))
        True
    """
    return any(transform.replays(converter) for transform in CHAIN)
