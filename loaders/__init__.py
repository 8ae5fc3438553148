"""The reshard runtime: each rank maps only its own file of an artifact into DTensors.

``import reshard.loaders`` pulls in torch and safetensors' format only; ``load_model`` imports transformers the
first time it is used (module ``__getattr__``), and nothing here imports the offline stage.

Example (``torchrun --nproc-per-node 2 serve.py``):
    >>> from reshard.loaders import load_model, load_state_dict  # doctest: +SKIP
    >>> model = load_model("./SmolLM2-1.7B-tp2")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from reshard.loaders.model import load_model
    from reshard.loaders.state_dict import load_state_dict

__all__ = ["load_model", "load_state_dict"]


def __getattr__(name: str) -> Any:
    # Lazy, so that the offline stage can use the format modules here (safetensors_file, integrity) without torch,
    # and load_model pulls transformers only when called.
    if name == "load_model":
        from reshard.loaders.model import load_model

        return load_model
    if name == "load_state_dict":
        from reshard.loaders.state_dict import load_state_dict

        return load_state_dict
    raise AttributeError(f"module 'reshard.loaders' has no attribute {name!r}")
