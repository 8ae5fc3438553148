"""The transform chain: one order that convert, re-shard and consolidate loop over, and records keyed by kind whose
JSON is the manifest format as it was (existing artifacts read and write back the same bytes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import reshard
from reshard.manifests.chunks import StoredTensor, contiguous
from reshard.manifests.errors import ManifestError
from reshard.manifests.plans import ConverterRecord
from reshard.manifests.records import KINDS, RENAME_KINDS
from reshard.manifests.transforms import FusedTensor, Interleaved, KvReplication, RowBlocks, Transforms
from reshard.transforms import Context, chain
from tests.helpers.checkpoints import make_checkpoint

# Every kind as manifests have written it, in the order they write it.
OPTIONS = {
    "renamed": {"model.a.weight": "a.weight"},
    "key_renames": [["^embed_out\\.", "lm_head."]],
    "fused": {"m.experts.down_proj": [["m.experts.0.w2.weight", 24], ["m.experts.1.w2.weight", 24]]},
    "replicate_kv": {"original_kv_heads": 2, "replicated_kv_heads": 4, "head_dim": 16},
    "concatenated": {"l.conv1d.weight": [["l.q_conv1d.weight", 4], ["l.k_conv1d.weight", 2]]},
    "chunked": {"l.gqkv.weight": [["l.q.weight", 2], ["l.k.weight", 2]]},
    "interleaved": {"l.gate_up_proj": {"source": "l.w13_weight", "dim": 1, "blocks": [4, 4]}},
}


def test_each_record_kind_belongs_to_one_transform_of_the_chain():
    kinds = [kind for transform in chain.CHAIN for kind in transform.KINDS]
    assert sorted(kinds) == sorted(KINDS)
    assert [transform.__name__.rpartition(".")[2] for transform in chain.CHAIN if chain.follows_tp(transform)] == [
        "interleave",
        "kv_heads",
    ]


def test_records_keep_the_manifest_json_as_it_was():
    options = Transforms.from_json(json.loads(json.dumps(OPTIONS)))
    assert json.dumps(options.to_json()) == json.dumps(OPTIONS)  # same keys, same order, same values
    assert options.fused == {
        "m.experts.down_proj": FusedTensor((("m.experts.0.w2.weight", 24), ("m.experts.1.w2.weight", 24)))
    }
    assert options.replicate_kv == KvReplication(2, 4, 16)
    assert options.chunked == {"l.gqkv.weight": RowBlocks((("l.q.weight", 2), ("l.k.weight", 2)))}
    assert options.interleaved == {"l.gate_up_proj": Interleaved("l.w13_weight", 1, (4, 4))}
    assert options.key_renames == (("^embed_out\\.", "lm_head."),)
    assert Transforms(fused=options.fused) == Transforms({"fused": options.fused})
    assert Transforms.from_json({}) == Transforms() and Transforms().to_json() == {}
    assert options.replaced({"replicate_kv": None}).replicate_kv is None


@pytest.mark.parametrize(
    ("options", "field"),
    [({"fused": {"a": [["b", 0]]}}, "options.fused"), ({"toy": {}}, "options.toy"), ({"renamed": {}}, "renamed")],
)
def test_a_bad_record_is_refused_naming_its_field(options: dict[str, object], field: str):
    with pytest.raises(ManifestError, match=field.replace(".", r"\.")):
        Transforms.from_json(options)


def test_made_from_follows_each_kind_and_the_renames_by_name():
    options = Transforms.from_json(OPTIONS)
    made = options.made_from(set(KINDS) - set(RENAME_KINDS))
    assert made["m.experts.down_proj"] == ("m.experts.0.w2.weight", "m.experts.1.w2.weight")
    assert made["l.q.weight"] == ("l.gqkv.weight",) and made["l.gate_up_proj"] == ("l.w13_weight",)
    assert options.made_from(RENAME_KINDS, ["model.a.weight", "embed_out.weight", "b"]) == {
        "model.a.weight": ("a.weight",)
    }


def test_forward_then_reverse_gives_the_checkpoint_back_and_where_each_tensor_comes_from():
    converter = ConverterRecord(
        "WeightConverter", ("experts.*.w2.weight",), ("experts.down_proj",), (("MergeModulelist", {"dim": 0}),)
    )
    stored = {
        f"m.experts.{e}.w2.weight": StoredTensor(f"m.experts.{e}.w2.weight", "F32", (2, 3), contiguous("f", 24 * e, 24))
        for e in range(2)
    }
    table, records = chain.forward(stored, Context(tp=2, converters=(converter,)))
    assert list(table) == ["m.experts.down_proj"] and table["m.experts.down_proj"].shape == (2, 2, 3)
    assert records.to_json() == {"fused": OPTIONS["fused"]}
    renamed = records.replaced({"renamed": {"m.experts.1.w2.weight": "ckpt.1.w2"}})
    back, came_from = chain.reverse(table, renamed, Context(tp=2))
    assert sorted(back) == ["ckpt.1.w2", "m.experts.0.w2.weight"]
    assert back["ckpt.1.w2"].chunks == stored["m.experts.1.w2.weight"].chunks
    assert came_from == {name: "m.experts.down_proj" for name in back}


def test_a_record_made_for_the_tp_refuses_loading_at_another(tmp_path: Path):
    from reshard.loaders.regrid import regrid_refusal

    source = make_checkpoint("llama_gqa8", tmp_path / "src", num_key_value_heads=2)
    manifest = reshard.convert(source, tmp_path / "art", tp=4, replicate_kv=True, progress=False)
    refusal = regrid_refusal(tmp_path / "art", manifest, 2)
    assert refusal is not None and refusal.startswith("its KV heads were replicated for tp=4"), refusal
