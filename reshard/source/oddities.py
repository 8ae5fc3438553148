"""Checkpoints transformers loads in ways that are easy to get wrong: pickles only, a tensor stored twice.

Kept apart from ``checkpoint`` (which decides what is read) because each answers one question about files already
found: what to tell a user whose weights are pickles, and whether two stored copies of a tensor are the same.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reshard.source.checkpoint import SourceTensor

CONVERT_SPACE = "https://huggingface.co/spaces/safetensors/convert"


def bin_refusal(root: Path, model: str, config: dict[str, Any], pickles: list[str]) -> str:
    """The one-line refusal of a checkpoint without safetensors weights, with the command that writes them: its
    pickles (``pickles``), or a Hub repo whose download had no safetensors (pickles are never fetched)."""
    architectures = config.get("architectures")
    named = architectures[0] if isinstance(architectures, list) and architectures else None
    cls = named if isinstance(named, str) and named.isidentifier() else "AutoModelForCausalLM"
    local = Path(model).expanduser().exists()
    source = str(root) if local else model
    target = f"{source.rstrip('/').rsplit('/', 1)[-1]}-safetensors"
    load = f"transformers.{cls}.from_pretrained({json.dumps(source)})"
    code = f"import transformers; {load}.save_pretrained({json.dumps(target)})"
    found = (
        f"{root}: only pickle weights ({', '.join(pickles[:3])}), which reshard never loads (unpickling runs code)"
        if pickles
        else f"{model}: no model.safetensors or index in the repo (reshard never loads pickle weights)"
    )
    return (
        f"{found}; write safetensors in a trusted environment: python -c {shlex.quote(code)} "
        f"(then copy the tokenizer files into {target} and convert it), or use {CONVERT_SPACE}"
    )


def same_tensor(a: SourceTensor, b: SourceTensor) -> bool:
    """Whether two stored tensors are the same tensor: dtype, shape and every byte."""
    if (a.entry.dtype, a.entry.shape, a.entry.nbytes) != (b.entry.dtype, b.entry.shape, b.entry.nbytes):
        return False
    step = 1 << 24
    with a.file.open("rb") as fa, b.file.open("rb") as fb:
        for start in range(0, a.entry.nbytes, step):
            size = min(step, a.entry.nbytes - start)
            fa.seek(a.entry.offset + start)
            fb.seek(b.entry.offset + start)
            if fa.read(size) != fb.read(size):
                return False
    return True
