"""Which of transformers' load-time weight converters reshard replays offline, and by which transform.

``experts`` replays the per-expert ones (``MergeModulelist``, with ``Concatenate(dim=1)`` of gate and up);
``row_blocks`` the dim-0 ``Concatenate`` and ``Chunk`` of whole tensors; ``interleave`` an ``Interleave``. Any other
converter (an ``Interleave`` inverse, a transpose, ...) makes a model type unsupported: the architectures table and
the model-type matrix ask here, and a conversion that meets one refuses it with one line (``experts.forward``).
Renamings (``PrefixChange`` and inkling2's index-shifting one included) are replayed by ``keymap``.
"""

from __future__ import annotations

from reshard.manifests import keymap
from reshard.manifests.plans import ConverterRecord
from reshard.transforms import experts, interleave, row_blocks


def replayable(converter: ConverterRecord) -> bool:
    """Whether a converter is one a transform here replays.

    Example:
        >>> replayable(ConverterRecord("WeightConverter", ("gate_up.weight",), ("gate.weight", "up.weight"),
        ...                            (("Chunk", {"dim": 0}),)))
        True
    """
    fused = converter.kind == "WeightConverter" and converter.operation_names in experts.SUPPORTED_OPERATIONS
    if converter.kind in keymap.RENAMING_KINDS:
        return keymap.replayable(converter)
    return fused or row_blocks.replays(converter) or interleave.replays(converter)
