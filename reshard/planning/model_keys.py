"""What transformers' loader compares a checkpoint with: the model's parameter and persistent-buffer names and
shapes, its tied weights and its ignore rules, read off the meta model ``load_model`` builds (the same class and
config), or, without transformers installed, the built-in plan's names alone.

The meta model is also where ``--dtype`` finds the modules transformers keeps in float32; it is built once per
config and dtype.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from reshard.manifests.errors import ReshardError
from reshard.manifests.plans import plan_for_config, plans_version
from reshard.manifests.preflight import text_config, tied_embeddings

if TYPE_CHECKING:
    from transformers import PreTrainedModel

_DECODER_LAYER = re.compile(r"^(.*?)layers\.(\d+)\.")


@dataclass(frozen=True)
class ModelKeys:
    """The model's side of transformers' load comparison.

    ``shapes`` maps every parameter and persistent buffer to its shape (``None`` when only the names with ``*`` for
    numbers are known: ``patterns``); ``tied`` maps tied parameters to the ones they are tied to (transformers'
    ``all_tied_weights_keys``); ``ignore_missing`` / ``ignore_unexpected`` are the regexes of
    ``_keys_to_ignore_on_load_missing`` / ``_unexpected`` (with transformers' own ``rotary_emb.inv_freq`` and
    ``position_ids`` rules); ``layers`` the decoder layer count and ``declared_layers`` the extra layers the config
    declares (``num_nextn_predict_layers``) beyond it, under ``decoder`` (``model.``)."""

    checked_against: str
    shapes: dict[str, tuple[int, ...]] | None
    patterns: frozenset[str]
    tied: dict[str, str]
    ignore_missing: str | None
    ignore_unexpected: str | None
    layers: int
    declared_layers: int
    decoder: str


def model_keys(config: dict[str, Any]) -> ModelKeys:
    """The keys of the model ``load_model`` builds for ``config``; the built-in plan's names when transformers is
    not installed or cannot build that model (``ReshardError`` when neither is known)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return _builtin_keys(config, "transformers not installed")
    try:
        return _transformers_keys(json.dumps(config, sort_keys=True))
    except ReshardError as exc:
        return _builtin_keys(config, str(exc))


def _layer_counts(config: dict[str, Any]) -> tuple[int, int]:
    text = text_config(config)
    layers = text.get("num_hidden_layers")
    extra = text.get("num_nextn_predict_layers", text.get("num_mtp_layers"))
    layers = layers if isinstance(layers, int) and not isinstance(layers, bool) else 0
    extra = extra if isinstance(extra, int) and not isinstance(extra, bool) and extra > 0 else 0
    return layers, extra


def _decoder(names: list[str], layers: int) -> str:
    """The prefix of the decoder's layers: the one whose layer numbers run up to ``layers`` (a vision tower's
    layers have another count), e.g. ``model.`` or ``model.language_model.``."""
    counts: dict[str, int] = {}
    for name in names:
        if match := _DECODER_LAYER.match(name):
            counts[match.group(1)] = max(counts.get(match.group(1), 0), int(match.group(2)) + 1)
    exact = sorted((p for p, n in counts.items() if n == layers), key=len)
    return exact[0] if exact else "model."


@functools.cache
def _transformers_keys(config_json: str) -> ModelKeys:
    import transformers

    config = json.loads(config_json)
    model = meta_model(config_json, "float32")
    shapes = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    buffers = [name for name, _ in model.named_buffers()]
    unexpected = set(model._keys_to_ignore_on_load_unexpected or ())
    if any(name.endswith("rotary_emb.inv_freq") for name in buffers):  # as _adjust_missing_and_unexpected_keys
        unexpected.add(r"rotary_emb\.inv_freq")
    if any(name.endswith("position_ids") for name in buffers):
        unexpected.add(r"(^|\.)position_ids$")
    layers, extra = _layer_counts(config)
    return ModelKeys(
        checked_against=f"{type(model).__name__} (transformers {transformers.__version__})",
        shapes=shapes,
        patterns=frozenset(),
        tied=dict(getattr(model, "all_tied_weights_keys", None) or {}),
        ignore_missing=_alternation(model._keys_to_ignore_on_load_missing),
        ignore_unexpected=_alternation(unexpected),
        layers=layers,
        declared_layers=extra,
        decoder=_decoder(list(shapes), layers),
    )


def _alternation(patterns: Any) -> str | None:
    patterns = sorted(patterns or ())
    return "|".join(f"({pattern})" for pattern in patterns) if patterns else None


def _builtin_keys(config: dict[str, Any], why: str) -> ModelKeys:
    builtin = plan_for_config(config, plans_version())  # transformers is missing: the newest plans
    if builtin is None or not builtin.parameters:
        raise ReshardError(f"model_type {config.get('model_type')!r}: {why}, and there is no built-in plan")
    patterns = frozenset(builtin.parameters)
    prefix = next((p.partition("layers.*.")[0] for p in patterns if "layers.*." in p), "model.")
    tied = {"lm_head.weight": f"{prefix}embed_tokens.weight"} if tied_embeddings(config) else {}
    layers, extra = _layer_counts(config)
    return ModelKeys(
        checked_against=f"the built-in plan's parameter names of {builtin.model_type} (no shapes, no ignore rules: "
        f"{why})",
        shapes=None,
        patterns=patterns,
        tied={k: v for k, v in tied.items() if k in patterns and v in patterns},
        ignore_missing=None,
        ignore_unexpected=None,
        layers=layers,
        declared_layers=extra,
        decoder=prefix,
    )


@functools.cache
def meta_model(config_json: str, dtype: str) -> PreTrainedModel:
    """The model ``load_model`` builds for this config.json (``AutoModelForCausalLM``'s class; a text model of a
    composite config from its text config), on the meta device in ``dtype``: children have added their ignore
    rules and dtype plans, and no initialiser has run."""
    try:
        import torch
        from transformers import CONFIG_MAPPING, AutoModelForCausalLM
        from transformers.initialization import no_init_weights
        from transformers.utils.generic import ContextManagers
    except ImportError as exc:
        raise ReshardError("this needs transformers (pip install 'reshard[transformers]')") from exc
    config = json.loads(config_json)
    model_type = str(config.get("model_type"))
    if model_type not in CONFIG_MAPPING:
        raise ReshardError(f"transformers does not know model_type {model_type!r}")
    config_class = CONFIG_MAPPING[model_type]
    decode = getattr(config_class, "_decode_special_floats", None)  # {"__float__": "Infinity"}, as from_pretrained
    config = decode(config) if callable(decode) else config
    try:
        model_config = config_class.from_dict(config)
    except Exception as exc:  # transformers' own config checks: from_pretrained would fail the same way
        raise ReshardError(f"transformers cannot read config.json as {model_type!r} ({_first_line(exc)})") from exc
    try:
        cls = cast("type[PreTrainedModel]", AutoModelForCausalLM._model_mapping[type(model_config)])
    except KeyError:
        raise ReshardError(f"transformers has no causal LM class for model_type {model_type!r}") from None
    text_config_class = model_config.sub_configs.get("text_config")
    if text_config_class is not None and getattr(cls, "config_class", None) is text_config_class:
        model_config = model_config.get_text_config()  # as load_model (and transformers' auto classes) build it
    torch_dtype = getattr(torch, dtype)
    contexts = [*cls.get_init_context(torch_dtype, False, False, False), no_init_weights(), torch.device("meta")]
    try:
        with ContextManagers(contexts):
            return cls(model_config)
    except Exception as exc:
        raise ReshardError(f"transformers cannot build {cls.__name__} from config.json ({_first_line(exc)})") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:120]}" if text else type(exc).__name__
