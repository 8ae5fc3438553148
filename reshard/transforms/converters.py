"""Which of transformers' load-time weight converters reshard replays offline, and by which transform.

``experts`` replays the per-expert ones (``MergeModulelist``, with ``Concatenate(dim=1)`` of gate and up);
``row_blocks`` the dim-0 ``Concatenate`` and ``Chunk`` of whole tensors; ``renames`` a ``PrefixChange`` that removes
a prefix. Any other converter (``Interleave``, a prefix added, a model's own rename class) makes a model type
unsupported: the architectures table and the model-type matrix ask here, and a conversion that meets one refuses it
with one line (``experts.forward``).
"""

from __future__ import annotations

from reshard.manifests.plans import ConverterRecord
from reshard.transforms import experts, renames, row_blocks


def replayable(converter: ConverterRecord) -> bool:
    """Whether a converter is one a transform here replays.

    Example:
        >>> replayable(ConverterRecord("WeightConverter", ("gate_up.weight",), ("gate.weight", "up.weight"),
        ...                            (("Chunk", {"dim": 0}),)))
        True
    """
    fused = converter.kind == "WeightConverter" and converter.operation_names in experts.SUPPORTED_OPERATIONS
    return fused or row_blocks.replays(converter) or renames.prefix_rule(converter) is not None
