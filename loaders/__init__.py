"""The reshard runtime: each rank maps only its own file of an artifact into DTensors.

``import reshard.loaders`` pulls in nothing but the format core (``reshard.manifests``); torch comes with
``load_state_dict`` and transformers with ``load_model``, each the first time it is used (module ``__getattr__``).
Nothing here imports the offline stage.

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
    # Lazy: load_model pulls transformers only when it is first used.
    if name == "load_model":
        from reshard.loaders.model import load_model

        return load_model
    if name == "load_state_dict":
        from reshard.loaders.state_dict import load_state_dict

        return load_state_dict
    raise AttributeError(f"module 'reshard.loaders' has no attribute {name!r}")
