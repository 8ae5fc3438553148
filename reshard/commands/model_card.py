"""The README.md model card ``reshard publish`` puts next to an artifact on the Hub: the manifest at a glance."""

from __future__ import annotations

from reshard.manifests import Manifest
from reshard.manifests.progress import format_size


def model_card(manifest: Manifest, repo_id: str, revision: str | None = None) -> str:
    """Markdown with Hub metadata: model, source, mesh, every file with its size and hash, the plan, and usage.

    Example:
        >>> print(model_card(read_manifest("./SmolLM2-1.7B-tp8"), "my-org/SmolLM2-1.7B-tp8"))  # doctest: +SKIP
    """
    source = manifest.source
    metadata = ["library_name: reshard", "tags:", "- reshard", "- tensor-parallel", "- safetensors"]
    if source.repo_id:  # the Hub links the card to the model it was converted from
        metadata.append(f"base_model: {source.repo_id}")
    mesh = " x ".join(f"{name}={size}" for name, size in manifest.mesh.items())
    origin = source.repo_id or "a local checkpoint"
    if source.revision or source.commit:
        origin += f" @ {source.revision or source.commit}"
    rank_bytes = sum(f.size for f in manifest.files if f.rank is not None)
    lines = [
        "---",
        *metadata,
        "---",
        "",
        f"# {repo_id.split('/')[-1]}",
        "",
        f"{manifest.architecture or 'The model'} pre-sharded for tensor parallelism ({mesh}) by reshard: one "
        "safetensors file per rank, and a `manifest.json` recording every tensor's placement, each rank's slice "
        "and xxh3-128 hashes. Each rank downloads `manifest.json`, the config files and its own rank file only.",
        "",
        "| | |",
        "|---|---|",
        f"| model | {manifest.architecture} ({manifest.model_type}) |",
        f"| source | {origin} |",
        f"| mesh | {mesh} |",
        f"| tensors | {len(manifest.tensors)} |",
        f"| rank files | {manifest.world_size} x ~{format_size(rank_bytes / manifest.world_size)} |",
        f"| format | {manifest.format} v{manifest.format_version}, reshard {manifest.tool_version} |",
        "",
        "## Use",
        "",
        "```python",
        "# torchrun --nproc-per-node " + str(manifest.world_size) + " serve.py",
        "from reshard.loaders import load_model",
        "",
        f'model = load_model("hf://{repo_id}{"@" + revision if revision else ""}")',
        "```",
        "",
        "## Files",
        "",
        "| file | rank | size | xxh3-128 |",
        "|---|---|---|---|",
        *(
            f"| `{f.path}` | {'' if f.rank is None else f.rank} | {format_size(f.size)} | `{f.xxh3}` |"
            for f in manifest.files
        ),
        "",
        "## Tensor-parallel plan",
        "",
        "| module | style |",
        "|---|---|",
        *(f"| `{rule}` | {style} |" for rule, style in sorted({**manifest.plan, **manifest.ep_plan}.items())),
        "",
    ]
    return "\n".join(lines)
