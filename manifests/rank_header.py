"""A rank file's header against its manifest: the one check the runtime, ``verify`` and re-sharding share.

The writer lays each rank's tensors out back to back in the manifest's order (``layout.file_order``), so every
``data_offsets`` is re-derived from the manifest and compared, and the file's ``__metadata__`` must name the
manifest's artifact: a rank file from another conversion is refused even when its shapes agree.
"""

from __future__ import annotations

from reshard.manifests.errors import shown
from reshard.manifests.manifest import Manifest
from reshard.manifests.safetensors import SafetensorsHeader

ARTIFACT_KEY = "reshard.artifact"  # the rank file's __metadata__ key holding its manifest's artifact id


def data_offsets(manifest: Manifest, rank: int) -> dict[str, tuple[int, int]]:
    """Each tensor's ``[begin, end)`` in rank file ``rank``'s data section: the tensors it holds back to back in the
    manifest's order, as the writer lays them out (``layout.file_order``)."""
    out, offset = {}, 0
    tp_rank = manifest.tp_rank_of(rank)
    for tensor in manifest.held_by(rank):
        nbytes = tensor.slice_nbytes(tp_rank)
        out[tensor.name] = (offset, offset + nbytes)
        offset += nbytes
    return out


def rank_header_problems(header: SafetensorsHeader, manifest: Manifest, rank: int) -> list[str]:
    """Where rank ``rank``'s file header disagrees with the manifest, one line per problem naming the tensor and the
    header field: its artifact id, the tensor names, each dtype, shape and ``data_offsets`` (which must be the
    manifest's tensors back to back, in its order, up to the end of the file)."""
    problems = []
    found = header.metadata.get(ARTIFACT_KEY)
    if found != manifest.artifact:
        problems.append(
            f"rank file belongs to another artifact: __metadata__.{ARTIFACT_KEY} is {shown(found)}, "
            f"the manifest's artifact is {shown(manifest.artifact)}"
        )
    expected = {tensor.name: tensor for tensor in manifest.held_by(rank)}
    if missing := [name for name in expected if name not in header.tensors]:
        count = f" ({len(missing)} tensors missing)" if len(missing) > 1 else ""
        problems.append(f"lacks tensor {missing[0]!r} that the manifest lists{count}")
    if extra := sorted(header.tensors.keys() - expected.keys()):
        problems.append(f"holds tensor {extra[0]!r} that the manifest does not list")
    offsets = data_offsets(manifest, rank)
    for name, item in header.tensors.items():
        tensor = expected.get(name)
        if tensor is None:
            continue
        shape = tensor.slices[manifest.tp_rank_of(rank)].shape
        if item.dtype != tensor.dtype or item.shape != shape:
            problems.append(
                f"tensor {name!r} is {item.dtype}{list(item.shape)}, but the manifest records "
                f"{tensor.dtype}{list(shape)} for rank {rank}"
            )
            continue
        begin = item.offset - header.data_start
        if (begin, begin + item.nbytes) != offsets[name]:
            problems.append(
                f"tensor {name!r}: data_offsets {[begin, begin + item.nbytes]}, but the manifest's order puts it at "
                f"{list(offsets[name])}"
            )
    end = max((stop for _, stop in offsets.values()), default=0)
    if not problems and header.data_start + end != header.file_size:
        problems.append(f"data section is {header.file_size - header.data_start} bytes, the tensors fill {end}")
    return problems
