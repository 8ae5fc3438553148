"""The built-in plans of the installed transformers (manifests/plans/<minor>, resolved through the older releases'
folders) match what it resolves for the dense families."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

PLANS_DIR = Path(__file__).resolve().parent.parent / "manifests" / "plans"
VERSION = transformers.__version__
DENSE_FAMILIES = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "granite",
    "olmo2",
    "cohere",
    "starcoder2",
    "phi3",
    "gpt_neox",
]


def _build_on_meta(model_type: str) -> Any:
    """Build the causal LM of ``model_type`` from its default config without allocating weights."""
    config = transformers.AutoConfig.for_model(model_type)
    with warnings.catch_warnings(), torch.device("meta"):
        warnings.simplefilter("ignore")
        return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("model_type", DENSE_FAMILIES)
def test_builtin_plan_matches_transformers(model_type: str) -> None:
    """The JSON plan equals the model's resolved ``_tp_plan`` / ``_ep_plan``."""
    from reshard.manifests.plans import builtin_plan

    document = builtin_plan(model_type, VERSION).to_json()
    model = _build_on_meta(model_type)

    assert document["model_type"] == model_type
    assert document["architecture"] == type(model).__name__
    assert dict(model._tp_plan or {}) == document["tp_plan"]
    assert dict(model._ep_plan or {}) == document["ep_plan"]
    assert document["styles"] == sorted(set(document["tp_plan"].values()))


def test_index_lists_dense_families() -> None:
    """INDEX.json has an entry, consistent with the per-model file, for every dense family."""
    index = json.loads((PLANS_DIR / "5.23" / "INDEX.json").read_text(encoding="utf-8"))
    for model_type in DENSE_FAMILIES:
        document = json.loads((PLANS_DIR / "5.23" / f"{model_type}.json").read_text(encoding="utf-8"))
        assert index[model_type] == {"architecture": document["architecture"], "styles": document["styles"]}
