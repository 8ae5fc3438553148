"""Where a tensor's bytes live: read ``/proc/self/maps`` to tell a view of a mapped file from a copy."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.distributed.tensor import DTensor


def mapped_file(tensor: torch.Tensor) -> Path | None:
    """The file whose mapping holds ``tensor``'s storage, or ``None`` if it lives in anonymous memory (a copy)."""
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    address = local.untyped_storage().data_ptr()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, stop = (int(part, 16) for part in fields[0].split("-"))
        if start <= address < stop:
            return Path(fields[5]) if len(fields) == 6 and fields[5].startswith("/") else None
    return None
