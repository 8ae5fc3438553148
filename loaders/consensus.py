"""Agree on failure across ranks, so that one rank's bad file makes every rank raise instead of hang.

A check that can fail on one rank only (its rank file is missing, truncated or corrupt; its node lacks the
manifest) must not leave the other ranks waiting in the next collective. Each step that can fail that way runs
inside ``agreed(mesh)``: on leaving the block every rank of the mesh shares its outcome (a small JSON payload in a
byte tensor, all-gathered per mesh dimension: no pickle), and if any rank failed, all of them raise the same error
naming the rank and the file. The block itself must run no collective, or a rank that failed early would leave
the others stuck there.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from reshard.manifests import errors
from reshard.manifests.errors import ManifestError, ReshardError

# (global rank, exception class name, message) of each rank that failed
Failure = tuple[int, str, str]
T = TypeVar("T", bound=tuple[Any, ...])


@contextmanager
def agreed(mesh: DeviceMesh | None) -> Iterator[None]:
    """Run the block on every rank of ``mesh``; if it raised on any rank, raise on all of them.

    Without a mesh (a plain single process) the block's exception propagates unchanged.
    """
    if mesh is None or mesh.size() == 1:
        yield
        return
    own: BaseException | None = None
    try:
        yield
    except Exception as exc:
        own = exc
    failed = [(dist.get_rank(), type(own).__name__, str(own))] if own is not None else []
    failed = _gather(mesh, failed)
    if not failed:
        return
    raise _combined(failed, mesh.size()) from own


def same_on_every_rank(mesh: DeviceMesh | None, value: str, what: str, origin: str) -> None:
    """Raise the same ``ManifestError`` on every rank of ``mesh`` unless all of them hold the same ``value``.

    A collective: call it outside ``agreed`` blocks, on every rank. Used for the manifest's digest, so that ranks
    reading different copies of an artifact (a node with a stale ``manifest.json``) fail together before any tensor
    is returned instead of computing with mismatched shards.
    """
    if mesh is None or mesh.size() == 1:
        return
    held = _gather(mesh, [(dist.get_rank(), value)])
    ranks: dict[str, list[int]] = {}
    for rank, item in held:
        ranks.setdefault(item, []).append(rank)
    if len(ranks) > 1:
        groups = "; ".join(f"ranks {sorted(r)}: {item}" for item, r in sorted(ranks.items(), key=lambda kv: kv[1]))
        raise ManifestError(f"{origin}: the ranks read different manifests ({what} differs: {groups})")


def _gather(mesh: DeviceMesh, items: list[T]) -> list[T]:
    """Every rank's items on every rank: all-gather along each mesh dimension in turn (their product is the mesh)."""
    device = torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else None
    for dim in range(mesh.ndim):
        group = mesh.get_group(dim)
        payloads = _all_gather_bytes(json.dumps(items).encode(), group, device)
        items = [tuple(item) for payload in payloads for item in json.loads(payload)]  # type: ignore[misc]
    return sorted(items)  # type: ignore[type-var]


def _all_gather_bytes(payload: bytes, group: dist.ProcessGroup, device: torch.device | None) -> list[bytes]:
    """All-gather variable-length byte strings as uint8 tensors: lengths first, then padded payloads."""
    size = dist.get_world_size(group)
    length = torch.tensor([len(payload)], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(size)]
    dist.all_gather(lengths, length, group=group)
    longest = max(int(n.item()) for n in lengths)
    padded = torch.zeros(max(longest, 1), dtype=torch.uint8)
    if payload:
        padded[: len(payload)] = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
    padded = padded.to(device) if device is not None else padded
    parts = [torch.zeros_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded, group=group)
    return [bytes(part[: int(n.item())].cpu().tolist()) for part, n in zip(parts, lengths, strict=True)]


def _combined(failed: list[Failure], size: int) -> ReshardError:
    """One error naming every failed rank, of the first failure's class when it is one of reshard's: one line per
    distinct failure, naming the ranks that share it (one line when every rank failed alike)."""
    ranks: dict[tuple[str, str], list[int]] = {}
    for rank, kind, message in failed:
        ranks.setdefault((kind, message), []).append(rank)
    lines = [f"{_ranks(held, size)}: {_text(kind, message)}" for (kind, message), held in ranks.items()]
    return (_reshard_class(failed[0][1]) or ReshardError)("\n".join(lines))


def _ranks(ranks: list[int], size: int) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]} of {size}"
    return f"all {size} ranks" if len(ranks) == size else f"ranks {', '.join(map(str, ranks))} of {size}"


def _text(kind: str, message: str) -> str:
    """reshard's errors speak for themselves; anything else (a bug) is shown with its type."""
    return message if _reshard_class(kind) else f"{kind}: {message}"


def _reshard_class(name: str) -> type[ReshardError] | None:
    cls = getattr(errors, name, None)
    return cls if isinstance(cls, type) and issubclass(cls, ReshardError) else None
