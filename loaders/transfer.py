"""Stream a byte range of a mapped file to an accelerator in one pass, through two pinned staging buffers.

A copy from pageable (mmap) memory makes the driver stage it through its own small pinned buffer synchronously.
Copying chunk ``i`` into our pinned buffer while chunk ``i - 1`` is in flight on a side stream overlaps the
page-cache reads with the DMA, and every byte is read from the mapping exactly once. A ``Residency`` thread reads
the file ahead of that loop, so a cold file's disk reads overlap the copies too instead of faulting in chunk by chunk.
"""

from __future__ import annotations

import torch

from reshard.loaders.tensors import Residency

CHUNK_BYTES = 64 * 1024 * 1024


def copy_to_device(flat: torch.Tensor, start: int, stop: int, device: torch.device) -> torch.Tensor:
    """``flat[start:stop]`` (a CPU uint8 tensor) as one uint8 tensor on ``device``."""
    out = torch.empty(stop - start, dtype=torch.uint8, device=device)
    if device.type != "cuda":  # no pinned-staging path: let the backend copy
        out.copy_(flat[start:stop])
        return out
    chunk = min(CHUNK_BYTES, max(stop - start, 1))
    staging = [torch.empty(chunk, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    in_flight: list[torch.cuda.Event | None] = [None, None]
    stream = torch.cuda.Stream(device)
    ahead = Residency(flat, start, stop)  # one thread faulting the file in ahead of the copies below
    try:
        for index, offset in enumerate(range(start, stop, chunk)):
            size = min(chunk, stop - offset)
            buffer = staging[index % 2]
            event = in_flight[index % 2]
            if event is not None:
                event.synchronize()  # the DMA that last read this staging buffer is done
            buffer[:size].copy_(flat[offset : offset + size])
            with torch.cuda.stream(stream):
                out[offset - start : offset - start + size].copy_(buffer[:size], non_blocking=True)
                done = torch.cuda.Event()
                done.record(stream)
            in_flight[index % 2] = done
        stream.synchronize()  # the tensors are ready, and the staging buffers may be freed
    finally:
        ahead.wait()
    return out
