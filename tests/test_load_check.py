"""``check_load`` on hand-made model keys (pure, no transformers): transformers' rules for tying (both ways), the
model's ignore rules, declared and undeclared extra layers, and the names-only check of the built-in plan."""

from __future__ import annotations

from reshard.planning.load_check import check_load
from reshard.planning.model_keys import ModelKeys, _builtin_keys

SHAPES = {
    "model.embed_tokens.weight": (10, 4),
    "model.layers.0.mlp.weight": (4, 4),
    "model.layers.0.mlp.bias": (4,),
    "model.norm.weight": (4,),
    "lm_head.weight": (10, 4),
}


def keys(**changes: object) -> ModelKeys:
    fields: dict[str, object] = {
        "checked_against": "test",
        "shapes": SHAPES,
        "patterns": frozenset(),
        "tied": {"lm_head.weight": "model.embed_tokens.weight"},
        "ignore_missing": None,
        "ignore_unexpected": None,
        "layers": 1,
        "declared_layers": 0,
        "decoder": "model.",
    }
    return ModelKeys(**{**fields, **changes})  # type: ignore[arg-type]


def tensors(*drop: str, **extra: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    table = {name: ("F32", shape) for name, shape in SHAPES.items() if name not in drop}
    return {**table, **{name.replace("__", "."): ("F32", shape) for name, shape in extra.items()}}


def test_tying_fills_either_side_and_an_equal_copy_is_unused():
    assert check_load(tensors("lm_head.weight"), keys()).report.tied == ("lm_head.weight",)
    swapped = check_load(tensors("model.embed_tokens.weight"), keys())  # transformers swaps the pair
    assert swapped.problems == [] and swapped.report.tied == ("model.embed_tokens.weight",)
    copy = check_load(tensors(), keys(), same_bytes=lambda a, b: True)
    assert [(u.name, u.reason) for u in copy.report.unused] == [("lm_head.weight", "tied_copy")]
    assert check_load(tensors(), keys(), same_bytes=lambda a, b: False).report.unused == ()
    assert check_load(tensors(), keys()).report.unused == ()  # unknown (headers only): kept


def test_missing_is_refused_unless_the_model_ignores_it_or_it_is_allowed():
    refused = check_load(tensors("model.layers.0.mlp.bias"), keys())
    assert "model.layers.0.mlp.bias" in refused.problems[0] and "--allow-missing" in refused.problems[0]
    assert check_load(tensors("model.layers.0.mlp.bias"), keys(ignore_missing=r"(mlp\.bias)")).problems == []
    allowed = check_load(tensors("model.layers.0.mlp.bias"), keys(), allow_missing=True)
    assert allowed.problems == [] and allowed.report.missing == ("model.layers.0.mlp.bias",)


def test_extra_layers_are_refused_unless_declared_or_ignored():
    extra = {"model__layers__1__mlp__weight": (4, 4)}
    assert "layer 1, but config.json has num_hidden_layers=1" in check_load(tensors(**extra), keys()).problems[0]
    declared = check_load(tensors(**extra), keys(declared_layers=1))
    assert declared.problems == [] and declared.report.unused[0].reason == "extra_layer"
    ignored = check_load(tensors(**extra), keys(ignore_unexpected=r"(model\.layers\.1\..*)"))
    assert ignored.problems == [] and ignored.report.unused[0].reason == "ignored"
    other = check_load(tensors(**{"vision__layers__5__weight": (2,)}), keys())  # another tower's layers: unexpected
    assert other.problems == [] and other.report.unused[0].reason == "unexpected"


def test_a_wrong_shape_is_refused():
    table = {**tensors(), "model.layers.0.mlp.weight": ("F32", (2, 4))}
    assert "the checkpoint has shape [2, 4]" in check_load(table, keys()).problems[0]


def test_names_only_check_of_the_built_in_plan():
    config = {"model_type": "llama", "num_hidden_layers": 2, "tie_word_embeddings": True}
    names = _builtin_keys(config, "transformers not installed")
    assert names.shapes is None and names.tied == {"lm_head.weight": "model.embed_tokens.weight"}
    full = {p.replace("*", str(i)): ("F32", (1,)) for p in names.patterns for i in range(2)}
    assert check_load(full, names).problems == []
    lacking = {k: v for k, v in full.items() if ".q_proj." not in k and k != "lm_head.weight"}
    result = check_load(lacking, names)  # lm_head filled by tying; no q_proj anywhere: missing
    assert result.report.missing == ("model.layers.*.self_attn.q_proj.weight",)
    assert result.report.tied == ("lm_head.weight",)
