"""Load an artifact at another tp than it was converted for: each rank's slices cut from the old rank files.

The layout of every tensor at the new tp comes from the same code that wrote the artifact (``layout``); where the
new slice lies in the old ranks' slices is ``layout.regrid_parts``. Each old rank file that holds a needed part is
checked against the manifest and mapped like a rank's own file (so only the pages of the needed rows and columns
are read), and each new slice is a view of one old slice where it lies inside it, else the parts concatenated.
What the new tp cannot split (heads, experts, replicated KV heads) is refused from the manifest and config alone,
before any byte is read.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from reshard.loaders.rank_file import open_rank_file
from reshard.manifests import Manifest
from reshard.manifests.errors import ReshardError, ShardabilityError
from reshard.manifests.layout import regrid_parts, tensor_layout
from reshard.manifests.preflight import check_shardability, require_expert_parallel
from reshard.manifests.records import KINDS

logger = logging.getLogger(__name__)


def regrid_refusal(root: str | os.PathLike[str], manifest: Manifest, tp: int) -> str | None:
    """Why the artifact cannot be loaded at ``tp`` ranks, or ``None`` if it can; a refusal lists the world sizes
    it does load at."""
    try:
        config = json.loads((Path(root) / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"its config.json cannot be read ({exc})"
    if not isinstance(config, dict):
        return "its config.json is not a JSON object"
    reason = _refusal(root, config, manifest, tp)
    if reason is None:
        return None
    sizes = [n for n in range(1, 2 * max(manifest.tp, 4) + 1) if _refusal(root, config, manifest, n) is None]
    sizes = sorted({*sizes, manifest.tp})
    offline = f"reshard --tp {tp} {root}"
    return f"{reason}; it loads on {', '.join(map(str, sizes))} ranks (or re-shard it offline: {offline})"


def _refusal(root: str | os.PathLike[str], config: dict[str, Any], manifest: Manifest, tp: int) -> str | None:
    if tp == manifest.tp:
        return None
    for kind in manifest.options.records:  # a record made for the artifact's tp: at another tp, another model
        if reason := KINDS[kind].follows_tp:
            return reason.format(tp=manifest.tp)
    verdict = check_shardability(config, manifest.plan, tp)
    if not verdict.ok:
        return "; ".join(verdict.problems)
    if manifest.ep_plan:
        try:
            require_expert_parallel(config, tp, tp, str(root))
        except ShardabilityError as exc:
            return str(exc)
    return None


def regrid_tensors(
    root: str | os.PathLike[str], manifest: Manifest, tp: int, rank: int, *, device: torch.device, verify: bool
) -> dict[str, torch.Tensor]:
    """Rank ``rank``'s local tensors at ``tp``, by name, cut from the old rank files that hold them."""
    layouts = {t.name: tensor_layout(t.name, t.dtype, t.shape, t.style, tp) for t in manifest.tensors}
    parts = {
        t.name: regrid_parts(tuple(tuple(s.ranges) for s in t.slices), layouts[t.name].ranges[rank])
        for t in manifest.tensors
        if t.placement.is_sharded
    }
    whole_from = rank % manifest.tp  # tensors every old rank holds whole: read them where the reads spread best
    needed = sorted({old for cut in parts.values() for old, _, _ in cut} | {whole_from})
    logger.info(
        "%s: converted for tp=%d, loaded at tp=%d: rank %d reads parts of rank files %s (convert with --tp %d for "
        "one file per rank, mapped without copies)",
        root, manifest.tp, tp, rank, needed, tp,
    )  # fmt: skip
    cpu = torch.device("cpu")
    # Fewer ranks than the artifact's: every needed old file is read whole, so its pages are made resident in the
    # background, all files at once, while the next is checked. More ranks: each reads part of a file; faults do.
    whole = manifest.tp > tp
    files = {r: open_rank_file(root, manifest, r, device=cpu, verify=verify, populate=whole) for r in needed}
    for file in files.values():
        file.wait_resident()
    old = {r: file.tensors for r, file in files.items()}
    local: dict[str, torch.Tensor] = {}
    for tensor in manifest.tensors:
        if tensor.name not in parts:
            local[tensor.name] = old[whole_from][tensor.name]
            continue
        dim = tensor.placement.dim
        assert dim is not None
        pieces = [old[r][tensor.name].narrow(dim, start, length) for r, start, length in parts[tensor.name]]
        shape = layouts[tensor.name].local_shapes[rank]
        if not pieces:
            value = torch.empty(shape, dtype=old[whole_from][tensor.name].dtype)
        elif len(pieces) == 1 and pieces[0].is_contiguous():
            value = pieces[0]  # inside one old slice: a view of its mapped file
        else:
            value = torch.cat(pieces, dim).contiguous()
        if tuple(value.shape) != shape:
            raise ReshardError(f"{tensor.name}: cut {list(value.shape)} at tp={tp}, the layout gives {list(shape)}")
        local[tensor.name] = value
    return local if device.type == "cpu" else {name: value.to(device) for name, value in local.items()}
