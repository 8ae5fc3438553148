"""The reshard runtime: each rank maps only its own file of an artifact into DTensors.

``import reshard.loaders`` pulls in torch and safetensors' format only; ``load_model`` imports transformers the
first time it is used (module ``__getattr__``), and nothing here imports the offline stage.

Example (``torchrun --nproc-per-node 2 serve.py``):
    >>> from reshard.loaders import load_model, load_state_dict  # doctest: +SKIP
    >>> model = load_model("./SmolLM2-1.7B-tp2")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from reshard.loaders.state_dict import load_state_dict

if TYPE_CHECKING:
    from reshard.loaders.model import load_model

__all__ = ["load_model", "load_state_dict"]


def __getattr__(name: str) -> Any:
    if name == "load_model":
        from reshard.loaders.model import load_model

        return load_model
    raise AttributeError(f"module 'reshard.loaders' has no attribute {name!r}")
