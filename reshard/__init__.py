"""reshard: pre-shard Hugging Face checkpoints for tensor parallelism.

The offline stage (``reshard.convert``) is imported lazily so that ``import reshard.loaders`` on an
inference node pulls in torch and safetensors only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from reshard.commands.convert import convert

__all__ = ["__version__", "convert"]


def __getattr__(name: str) -> Any:
    if name == "convert":
        from reshard.commands.convert import convert

        return convert
    raise AttributeError(f"module 'reshard' has no attribute {name!r}")
