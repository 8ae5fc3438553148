"""The model dtype of ``dtype="auto"``, decided as transformers' ``_get_dtype`` decides it.

config.json's ``dtype`` first (or the older ``torch_dtype`` when ``dtype`` is absent or null), at the level of the
config the model is built from: the top level, or ``text_config`` for a text model of a multimodal checkpoint.
Only when that config names none: the index's ``metadata.dtype``, else the first floating tensor (float8 skipped)
of the first weights file, in name order. The artifact's config.json records that derived dtype where the source's
names none, so the runtime, which reads the artifact alone, builds the model transformers builds from the source.
"""

from __future__ import annotations

from typing import Any

from reshard.manifests.dtypes import MODEL_DTYPES
from reshard.manifests.errors import SourceError, shown

# torch's floating dtypes a model can be built in (and torch's aliases of them); any other name fails in
# transformers: float8 and integers cannot be torch's default dtype, other strings are no torch attribute.
MODEL_DTYPE_NAMES = tuple(MODEL_DTYPES.values())
_ALIASES = {"float": "float32", "half": "float16", "double": "float64"}


def configured_dtype(config: dict[str, Any]) -> Any:
    """The dtype one config level names, as ``PreTrainedConfig`` reads it: ``dtype``, else ``torch_dtype``."""
    value = config.get("dtype")
    return value if value is not None else config.get("torch_dtype")


def check_config_dtypes(config: dict[str, Any], origin: str) -> None:
    """Refuse a dtype field transformers cannot build a model in, in one line naming it."""
    for level, sub in _levels(config):
        for key in ("dtype", "torch_dtype"):
            value = sub.get(key)
            if value is None or (isinstance(value, str) and (value in MODEL_DTYPE_NAMES or value in _ALIASES)):
                continue
            raise SourceError(
                f"{origin}: {level}{key} is {shown(value)}, which transformers cannot build a model in (one of "
                f"{', '.join(MODEL_DTYPE_NAMES)})"
            )


def needs_weights_dtype(config: dict[str, Any]) -> bool:
    """Whether some config level a model may be built from names no dtype (transformers then asks the weights)."""
    return any(configured_dtype(sub) is None for _, sub in _levels(config))


def index_dtype(metadata: dict[str, Any], origin: str) -> str | None:
    """The index's ``metadata.dtype``, which transformers prefers to the weights when config.json names none."""
    value = metadata.get("dtype")
    if value is None:
        return None
    if not isinstance(value, str) or (value not in MODEL_DTYPE_NAMES and value not in _ALIASES):
        raise SourceError(
            f"{origin}: metadata.dtype is {shown(value)}, which transformers would build the model in (config.json "
            f"names none); it must be one of {', '.join(MODEL_DTYPE_NAMES)}"
        )
    return _ALIASES.get(value, str(value))


def with_weights_dtype(config: dict[str, Any], derived: str | None) -> dict[str, Any] | None:
    """config.json with ``dtype`` set to ``derived`` at each level that names none, or ``None`` if nothing changes.

    Example:
        >>> with_weights_dtype({"model_type": "llama"}, "bfloat16")
        {'model_type': 'llama', 'dtype': 'bfloat16'}
    """
    if derived is None or not needs_weights_dtype(config):
        return None
    new = dict(config)
    if configured_dtype(config) is None:
        new["dtype"] = derived
    text = config.get("text_config")
    if isinstance(text, dict) and configured_dtype(text) is None:
        new["text_config"] = {**text, "dtype": derived}
    return new


def _levels(config: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    text = config.get("text_config")
    return [("", config), *([("text_config.", text)] if isinstance(text, dict) else [])]
