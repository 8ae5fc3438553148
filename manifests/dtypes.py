"""Every safetensors dtype in one table: its size, torch's name for it, and whether it may be cast.

The container (``safetensors.py``), the validator, the offline stage's casts and ``--dtype`` choices and the
runtime's tensor views all read this table, so a dtype is added in one place. Sizes are in bits: ``F4`` packs two
elements into a byte, so a tensor's or a row's byte count is only defined when its bits end on a byte boundary,
and both ``nbytes`` and ``row_bytes`` refuse the rest rather than round. Pure: no torch.

Example:
    >>> nbytes("BF16", (3, 4)), nbytes("F4", (3, 4)), row_bytes("F4", (3, 4), 0)
    (24, 6, 2)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from reshard.manifests.errors import FileFormatError, ShardabilityError


@dataclass(frozen=True)
class Dtype:
    """One safetensors dtype.

    ``bits`` per element; ``torch`` is the name of the ``torch`` dtype a tensor view takes (``float4_e2m1fn_x2``
    holds a pair of F4 elements, so its last dim is half the header's); ``castable`` marks the floating dtypes a
    model is built in, which ``--dtype`` and ``dtype=`` may convert (quantized data such as float8 never is: its
    scales would no longer match); ``stored_as`` names it as a ``--dtype`` choice, where it is one.
    """

    name: str
    bits: int
    torch: str
    castable: bool = False
    stored_as: str | None = None

    @property
    def per_torch_element(self) -> int:
        """Elements of this dtype in one element of its torch dtype (2 for F4's ``float4_e2m1fn_x2``)."""
        return 8 // self.bits if self.bits < 8 else 1


# safetensors' own names (``Dtype`` in its Rust crate; F8_E8M0 and F4 since 0.6). The model dtypes come first, in
# the order messages and ``--dtype``'s choices list them.
DTYPES: dict[str, Dtype] = {
    d.name: d
    for d in (
        Dtype("F32", 32, "float32", castable=True, stored_as="float32"),
        Dtype("BF16", 16, "bfloat16", castable=True, stored_as="bfloat16"),
        Dtype("F16", 16, "float16", castable=True, stored_as="float16"),
        Dtype("F64", 64, "float64", castable=True),
        Dtype("F8_E4M3", 8, "float8_e4m3fn"),
        Dtype("F8_E5M2", 8, "float8_e5m2"),
        Dtype("F8_E8M0", 8, "float8_e8m0fnu"),
        Dtype("F4", 4, "float4_e2m1fn_x2"),
        Dtype("I64", 64, "int64"),
        Dtype("U64", 64, "uint64"),
        Dtype("I32", 32, "int32"),
        Dtype("U32", 32, "uint32"),
        Dtype("I16", 16, "int16"),
        Dtype("U16", 16, "uint16"),
        Dtype("I8", 8, "int8"),
        Dtype("U8", 8, "uint8"),
        Dtype("BOOL", 8, "bool"),
    )
}

# The floating dtypes a model is built in, by torch's name (what ``dtype="auto"`` may pick).
MODEL_DTYPES: dict[str, str] = {d.name: d.torch for d in DTYPES.values() if d.castable}

# ``--dtype`` choices -> the safetensors dtype floating tensors are stored in ("auto": each as in the source).
STORED_DTYPES: dict[str, str | None] = {
    "auto": None,
    **{d.stored_as: d.name for d in DTYPES.values() if d.stored_as is not None},
}


def nbytes(dtype: str, shape: Sequence[int]) -> int:
    """Bytes of a tensor of ``shape`` in ``dtype``; a sub-byte tensor that does not end on a byte boundary is refused,
    as safetensors refuses it (an F4 tensor of 3 elements is 12 bits: no file can hold it)."""
    bits = math.prod(shape) * DTYPES[dtype].bits
    if bits % 8:
        raise FileFormatError(f"{dtype}{list(shape)} is {bits} bits, not a whole number of bytes")
    return bits // 8


def row_bytes(dtype: str, shape: Sequence[int], dim: int, name: str = "") -> int:
    """Bytes per index of ``dim`` (the product of the dims after it): the unit a tensor is cut in along ``dim``.

    Refused when that is not whole bytes (F4 cut along its last dim: ranks would split bytes), naming ``name``.
    """
    bits = math.prod(shape[dim + 1 :]) * DTYPES[dtype].bits
    if bits % 8:
        raise ShardabilityError(
            f"tensor {name!r}: {dtype}{list(shape)} cut along dim {dim} would split bytes "
            f"({bits} bits per index); a sub-byte tensor is cut only where whole bytes are"
        )
    return bits // 8
