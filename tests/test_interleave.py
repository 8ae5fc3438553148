"""Interleaved rows (``reshard/transforms/interleave.py``) and index-shifting renames: inkling2_text's checkpoint holds
each expert's gate and up rows alternating (``w13_weight``), which transformers de-interleaves per rank after cutting
it (``Interleave(dim=1)``), and its ``attn_res.attn_queries.i`` belong to layer ``i + 1``
(``Inkling2IndexOffsetWeightRename``). Replayed offline as strided chunk moves and literal renames, recorded, checked
by the validator, and undone by consolidation to the checkpoint's own keys and bytes."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reshard
from reshard.commands.consolidate import consolidate
from reshard.manifests import read_manifest
from reshard.manifests.chunks import StoredTensor, StridedMove, contiguous, locate, row_major_chunks, strided_moved
from reshard.manifests.errors import ManifestError, ShardabilityError
from reshard.manifests.plans import ConverterRecord, builtin_plan
from reshard.manifests.transforms import FusedTensor, Interleaved, Transforms
from reshard.transforms import interleave
from reshard.transforms.converters import replayable

pytest.importorskip("transformers")


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _bytes(chunks, nbytes: int, files: dict[str, bytes]) -> bytes:
    out = bytearray(nbytes)
    for piece in locate(tuple(chunks), 0, nbytes):
        out[piece.start : piece.start + piece.nbytes] = files[str(piece.file)][
            piece.offset : piece.offset + piece.nbytes
        ]
    return bytes(out)


@pytest.mark.parametrize("seed", range(40))
def test_strided_moves_de_interleave_blocks_from_whole_or_sliced_sources(seed: int):
    """Blocks of rows de-interleaved (and interleaved back) from a tensor stored whole or as two ranks' column
    slices equal the row permutation done by hand."""
    rng = random.Random(seed)
    experts, rows, row = rng.randint(1, 3), 2 * rng.randint(1, 4), rng.choice([1, 3, 4])
    data = bytes(rng.randrange(256) for _ in range(experts * rows * row))
    files, source = {"f": b"\0" * 5 + data}, contiguous("f", 5, len(data))
    if rows % 4 == 0 and rng.random() < 0.5:  # two old ranks, each a run per expert
        half = rows // 2
        for name, (a, b) in (("a", (0, half)), ("b", (half, rows))):
            files[name] = b"".join(data[(e * rows + a) * row : (e * rows + b) * row] for e in range(experts))
        shape = (experts, rows, row)
        source = row_major_chunks("a", 0, shape, row, 1, [(0, half)]) + row_major_chunks(
            "b", 0, shape, row, 1, [(half, rows)]
        )
    block = rng.choice([b for b in range(2, rows + 1, 2) if rows % b == 0])
    record = Interleaved("w13", 1, (block,) * (rows // block))
    table = {"w13": StoredTensor("w13", "U8", (experts, rows, row), source)}
    model = interleave.forward(table, {"gate_up": record})["gate_up"]
    expected = bytearray(len(data))
    for e in range(experts):
        for start in range(0, rows, block):
            for k in range(block):
                to = e * rows + start + k
                src = e * rows + start + (2 * k if k < block // 2 else 2 * (k - block // 2) + 1)
                expected[to * row : (to + 1) * row] = data[src * row : (src + 1) * row]
    assert _bytes(model.chunks, len(data), files) == bytes(expected)
    back = interleave.reverse({"gate_up": model}, {"gate_up": record})["w13"]
    assert _bytes(back.chunks, len(data), files) == data


def test_each_half_of_a_block_is_one_strided_chunk():
    """Not a chunk per row: 8 experts x 4 blocks x 2 halves of a whole checkpoint tensor are 64 chunks."""
    tensor = StoredTensor("w13", "F32", (8, 32, 16), contiguous("f", 0, 8 * 32 * 16 * 4))
    chunks = interleave.forward({"w13": tensor}, {"g": Interleaved("w13", 1, (8, 8, 8, 8))})["g"].chunks
    assert len(chunks) == 64 and {(c.count, c.stride, c.file_stride) for c in chunks} == {(4, 64, 128)}
    stored = StoredTensor("g", "F32", (8, 32, 16), contiguous("f", 0, 8 * 32 * 16 * 4))  # a tp 1 artifact's
    back = interleave.reverse({"g": stored}, {"g": Interleaved("w13", 1, (8, 8, 8, 8))})["w13"].chunks
    assert len(back) == 64 and {(c.count, c.stride, c.file_stride) for c in back} == {(4, 128, 64)}
    assert strided_moved(stored.chunks, [StridedMove(0, 0, 64, 4, 128, 64)])[0].count == 4


def test_which_converters_are_replayed():
    assert all(replayable(c) for c in builtin_plan("inkling2_text", "5.23").key_converters)
    inverse = ConverterRecord("WeightConverter", ("a",), ("b",), (("Interleave", {"dim": 1, "inverse": True}),))
    assert not replayable(inverse)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.helpers.tester_configs import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("interleave")
    out = {"source": make_tiny_checkpoint("inkling2_text", root / "src")}
    for tp in (1, 2, 4):
        reshard.convert(out["source"], root / f"tp{tp}", tp=tp, progress=False)
        out[f"tp{tp}"] = root / f"tp{tp}"
    return out


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_rank_files_hold_what_transformers_makes_of_each_rank_slice(artifacts, tp: int):
    """Rank r's gate_up_proj is transformers' ``Interleave`` of rank r's slice of ``w13_weight`` (it cuts before
    converting), and at tp 1 every tensor equals transformers' own load (renames and the index shift included)."""
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import Interleave

    manifest = read_manifest(artifacts[f"tp{tp}"])
    assert manifest.options.interleaved and all(
        r.blocks == (32 // tp,) * tp for r in manifest.options.interleaved.values()
    )
    original = tensors_of(artifacts["source"])
    for rank in range(tp):
        held = load_file(artifacts[f"tp{tp}"] / manifest.rank_file(rank).path)
        for name, record in manifest.options.interleaved.items():
            key = manifest.options.checkpoint_keys([name])[0]
            local = torch.chunk(original[key], tp, dim=record.dim)[rank]
            expected = Interleave(dim=record.dim).convert({"w": local}, ["w"], ["g"])["g"]
            assert torch.equal(held[name], expected), (name, rank)
    if tp == 1:
        reference = AutoModelForCausalLM.from_pretrained(artifacts["source"], dtype=torch.float32).state_dict()
        held = load_file(artifacts["tp1"] / manifest.rank_file(0).path)
        assert "model.layers.1.attention_input.query" in held
        assert set(held) == {k for k in reference if k in held} and all(
            torch.equal(held[k], reference[k]) for k in held
        )


@pytest.mark.parametrize("name", ["tp2", "tp4"])
def test_consolidate_gives_the_checkpoint_back(artifacts, tmp_path: Path, name: str):
    consolidate(artifacts[name], tmp_path / "back", progress=False)
    original, back = tensors_of(artifacts["source"]), tensors_of(tmp_path / "back")
    assert sorted(back) == sorted(original)  # w13_weight, attn_res.attn_queries.0, the conv renames: its own keys
    for key, tensor in original.items():
        assert torch.equal(back[key].view(torch.uint8), tensor.view(torch.uint8)), key
    keys = read_manifest(artifacts[name]).options.checkpoint_keys(
        [t.name for t in read_manifest(artifacts[name]).tensors]
    )
    assert sorted(keys) == sorted(original)


def test_reshard_re_derives_the_blocks(artifacts, tmp_path: Path):
    """tp 2 → 4: the records keep their sources, the blocks follow the new ranks; the bytes equal a direct tp 4."""
    manifest = reshard.convert(artifacts["tp2"], tmp_path / "tp4", tp=4, progress=False)
    direct = read_manifest(artifacts["tp4"])
    assert manifest.options.interleaved == direct.options.interleaved
    assert [t.slices for t in manifest.tensors] == [t.slices for t in direct.tensors]  # every slice's hash too


def test_odd_blocks_are_refused():
    """transformers' own load fails when a rank's rows are odd (gate and up would mix): refused, naming the tensor."""
    tensor = StoredTensor("l.w13_weight", "F32", (2, 74, 4), contiguous("f", 0, 2 * 74 * 16))
    converter = builtin_plan("inkling2_text", "5.23").key_converters[0]
    blocks = interleave.blocks_for(lambda name: "colwise", 2)
    with pytest.raises(ShardabilityError, match=r"gate_up_proj: .*\[37, 37\] rows of dim 1"):
        interleave.records({"l.mlp.experts.w13_weight": tensor}, (converter,), blocks)
    assert interleave.blocks_for(lambda name: "grouped_gemm", 2)("x", (2, 74, 4), 1) == (74,)  # whole experts


def _edited(artifact: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    edit(data["options"]["interleaved"][sorted(data["options"]["interleaved"])[0]], data["options"]["interleaved"])
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r, o: r.update(blocks=[16, 14, 2]), r"options\.interleaved\..*\.blocks: \[16, 14, 2\], but the ranks"),
        (lambda r, o: r.update(blocks=[16, 15]), r"options\.interleaved\..*\.blocks must be a list of even"),
        (lambda r, o: r.update(blocks=[16, 18]), r"options\.interleaved\..*\.blocks: blocks of \[16, 18\] rows"),
        (lambda r, o: r.update(dim="1"), r"options\.interleaved\..*\.dim must be a non-negative integer"),
        (lambda r, o: r.update(dim=True), r"options\.interleaved\..*\.dim must be a non-negative integer"),
        (lambda r, o: r.update(source="lm_head.weight"), r"\.source: 'lm_head.weight' is a tensor of this manifest"),
        (lambda r, o: r.pop("source"), r"options\.interleaved\..* must be an object with exactly"),
        (lambda r, o: o.update(x=o.pop(sorted(o)[0])), r"options\.interleaved\.x: 'x' is not a tensor"),
    ],
)  # fmt: skip
def test_bad_records_are_refused_naming_the_field(artifacts, tmp_path: Path, edit, message: str):
    folder = _edited(artifacts["tp2"], tmp_path, edit)
    with pytest.raises(ManifestError, match=message) as caught:
        read_manifest(folder)
    assert len(str(caught.value).splitlines()) == 1


def test_manifest_round_trips_and_follows_the_schema(artifacts):
    from importlib import resources

    from reshard.manifests import Manifest

    text = (artifacts["tp2"] / "manifest.json").read_text()
    assert Manifest.from_json(text).to_json() == text
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((resources.files("reshard.manifests") / "manifest.schema.json").read_text())
    jsonschema.validate(json.loads(text), schema)


def test_renames_with_a_capturing_group_are_undone():
    """inkling2's ``(convolution|sconv)\\.weight(?!_)`` → ``\\1.conv1d.weight`` and the shifted indices."""
    options = Transforms(
        key_renames=(
            (r"model\.llm\.", "model."),
            (r"(convolution|sconv)\.weight(?!_)", r"\1.conv1d.weight"),
            (r"attn_res\.attn_queries\.10", "layers.11.attention_input.query"),
            (r"attn_res\.attn_queries\.1", "layers.2.attention_input.query"),
        ),
        interleaved={"model.l.mlp.experts.gate_up_proj": Interleaved("model.l.mlp.experts.w13_weight", 1, (4,))},
    )
    names = [
        "model.l.k_sconv.conv1d.weight",
        "model.layers.11.attention_input.query",
        "model.l.mlp.experts.gate_up_proj",
    ]
    assert options.checkpoint_keys(names) == [
        "model.llm.l.k_sconv.weight",
        "model.llm.attn_res.attn_queries.10",
        "model.llm.l.mlp.experts.w13_weight",
    ]


def test_fused_parts_are_named_as_in_the_checkpoint():
    """A fused tensor's parts under renamed names (kimi_linear's ``block_sparse_moe.`` → ``mlp.``) are given back
    under the checkpoint's own keys, as save_pretrained must write them."""
    options = Transforms(
        key_renames=((r"\.block_sparse_moe\.", ".mlp."),),
        fused={"m.0.mlp.experts.down_proj": FusedTensor((("m.0.mlp.experts.0.w2.weight", 8),))},
    )
    assert options.checkpoint_keys(["m.0.mlp.experts.down_proj"]) == ["m.0.block_sparse_moe.experts.0.w2.weight"]


def test_fused_parts_of_a_real_checkpoint_are_its_keys(tmp_path: Path):
    from tests.helpers.tester_configs import make_tiny_checkpoint

    source = make_tiny_checkpoint("kimi_linear", tmp_path / "src")
    manifest = reshard.convert(source, tmp_path / "art", tp=2, progress=False)
    assert manifest.options.fused
    keys = manifest.options.checkpoint_keys([t.name for t in manifest.tensors])
    assert sorted(keys) == sorted(tensors_of(source))


def test_loading_at_another_tp_is_refused_with_the_way_out(artifacts):
    """The blocks follow the tp: the runtime's regrid would cut de-interleaved rows at the wrong places."""
    from reshard.loaders.regrid import regrid_refusal

    manifest = read_manifest(artifacts["tp2"])
    refusal = regrid_refusal(artifacts["tp2"], manifest, 4)
    assert refusal is not None and "re-shard it offline" in refusal
