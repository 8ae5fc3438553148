"""``reshard inspect``: what an artifact holds, from its manifest alone (no tensor bytes are read).

It also lists the source files the conversion left behind (pickles, symlinks leading out, files off the allowlist)
so that a reviewer sees what the artifact deliberately lacks.
"""

from __future__ import annotations

import json
from typing import Any

from reshard.manifests import Manifest
from reshard.manifests.pipeline import describe_split
from reshard.manifests.progress import format_size


def summarize(manifest: Manifest) -> dict[str, Any]:
    """A JSON-ready summary: model, mesh, plan, bytes per rank file, and one row per tensor."""
    return {
        "model_type": manifest.model_type,
        "architecture": manifest.architecture,
        "mesh": manifest.mesh,
        "format_version": manifest.format_version,
        "tool_version": manifest.tool_version,
        "transformers_version": manifest.transformers_version,
        "source": {
            "repo_id": manifest.source.repo_id,
            "revision": manifest.source.revision,
            "skipped": manifest.source.skipped,
        },
        "plan": manifest.plan,
        "options": manifest.options.to_json(),
        "lineage": manifest.lineage,
        "pipeline": manifest.pipeline.to_json() if manifest.pipeline is not None else None,
        "rank_files": [
            {"rank": f.rank, "stage": manifest.stage_of(f.rank), "path": f.path, "bytes": f.size}
            for f in manifest.files
            if f.rank is not None
        ],
        "other_files": [{"path": f.path, "bytes": f.size} for f in manifest.files if f.rank is None],
        "tensors": [
            {**t.to_json(slices=False), "local_shapes": [list(s.shape) for s in t.slices]} for t in manifest.tensors
        ],
    }


def render_text(manifest: Manifest) -> str:
    """The summary as a human-readable report."""
    summary = summarize(manifest)
    lines = [
        f"model        {summary['architecture']} ({summary['model_type']})",
        f"mesh         {' x '.join(f'{k}={v}' for k, v in manifest.mesh.items())}",
        f"source       {summary['source']['repo_id'] or '(local folder)'}"
        + (f" @ {summary['source']['revision']}" if summary["source"]["revision"] else ""),
        *(f"  skipped    {entry}" for entry in manifest.source.skipped),
        f"format       v{manifest.format_version}, written by reshard {manifest.tool_version}",
        f"plans of     transformers {manifest.transformers_version or '5.23 (not recorded)'}",
        "plan",
        *(f"  {rule:<48} {style}" for rule, style in sorted(manifest.plan.items())),
        *([f"stages       {describe_split(manifest.pipeline)}"] if manifest.pipeline is not None else []),
        "rank files",
        *(
            f"  {f['path']:<40} {format_size(f['bytes']):>10}" + (f"  stage {f['stage']}" if manifest.pp > 1 else "")
            for f in summary["rank_files"]
        ),
        f"tensors ({len(manifest.tensors)})",
        f"  {'name':<52} {'dtype':<5} {'global shape':<16} {'placement':<18} rank 0 shape"
        + ("    stages" if manifest.pp > 1 else ""),
    ]
    for tensor in manifest.tensors:
        placement = tensor.placement.kind + (f"({tensor.placement.dim})" if tensor.placement.dim is not None else "")
        stages = f"    {','.join(map(str, tensor.stages))}" if tensor.stages is not None else ""
        lines.append(
            f"  {tensor.name:<52} {tensor.dtype:<5} {json.dumps(list(tensor.shape)):<16} {placement:<18} "
            f"{json.dumps(list(tensor.slices[0].shape)):<12}{stages}".rstrip()
        )
    return "\n".join(lines)
