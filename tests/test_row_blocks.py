"""Row blocks (``reshard/transforms/row_blocks.py``): transformers' dim-0 ``Concatenate`` (kimi_linear, olmo_hybrid,
bailing_hybrid: ``q/k/v_conv1d`` → ``conv1d``) and ``Chunk`` (hrm_text: ``gqkv_proj`` → four projections) replayed
offline; the manifest records them, the validator checks the records against the tensors, and consolidation gives
the checkpoint's own keys and bytes back."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import reshard
from reshard.commands.consolidate import consolidate
from reshard.manifests import read_manifest
from reshard.manifests.chunks import StoredTensor, contiguous, locate, merged
from reshard.manifests.errors import ManifestError, SourceError
from reshard.manifests.plans import ConverterRecord, builtin_plan
from reshard.manifests.transforms import RowBlocks, Transforms
from reshard.transforms import row_blocks
from reshard.transforms.converters import replayable

pytest.importorskip("transformers")

CONCATENATED = ("olmo_hybrid", "kimi_linear", "bailing_hybrid")
CHUNKED = ("hrm_text",)


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _stored(name: str, rows: int, file: str, width: int = 3) -> StoredTensor:
    return StoredTensor(name, "F32", (rows, width), contiguous(file, 100, rows * width * 4))


def _runs(tensor: StoredTensor) -> list[tuple[str, int, int]]:
    nbytes = tensor.shape[0] * tensor.shape[1] * 4
    return [(str(p.file), p.offset, p.nbytes) for p in merged(locate(tensor.chunks, 0, nbytes))]


@pytest.mark.parametrize(("rows", "count"), [(10, 4), (12, 4), (7, 3), (5, 5), (1, 1), (74, 2)])
def test_chunk_rows_are_torch_chunks(rows: int, count: int):
    expected = [piece.shape[0] for piece in torch.empty(rows, 2).chunk(count)]
    assert row_blocks.chunk_rows(_stored("w", rows, "f"), count) == expected


def test_chunk_into_fewer_pieces_than_targets_is_refused():
    """torch.chunk(5 rows, 4) gives 3 pieces of 2, 2, 1: transformers would leave the fourth model tensor empty."""
    with pytest.raises(SourceError, match="do not chunk into 4"):
        row_blocks.chunk_rows(_stored("w", 5, "f"), 4)


def test_join_places_each_part_at_its_rows_and_cut_takes_them_back():
    parts = [_stored("q", 2, "a"), _stored("k", 3, "b"), _stored("v", 1, "c")]
    whole = row_blocks.join("qkv", parts)
    assert whole.shape == (6, 3)
    assert _runs(whole) == [("a", 100, 24), ("b", 100, 36), ("c", 100, 12)]
    back = row_blocks.cut(whole, [("q", 2), ("k", 3), ("v", 1)])
    assert {name: (t.shape, _runs(t)) for name, t in back.items()} == {p.name: (p.shape, _runs(p)) for p in parts}


def test_join_refuses_parts_of_another_width():
    with pytest.raises(SourceError, match="does not join"):
        row_blocks.join("qkv", [_stored("q", 2, "a"), _stored("k", 2, "b", width=4)])


def test_forward_and_reverse_are_inverse():
    concatenate = ConverterRecord(
        "WeightConverter", ("q_conv1d.weight", "k_conv1d.weight"), ("conv1d.weight",), (("Concatenate", {"dim": 0}),)
    )
    chunk = ConverterRecord(
        "WeightConverter", ("mlp.gate_up_proj.weight",), ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
        (("Chunk", {"dim": 0, "num_shards_attribute": None}),),
    )  # fmt: skip
    table = {
        name: _stored(name, rows, name)
        for name, rows in [
            ("l.0.q_conv1d.weight", 4),
            ("l.0.k_conv1d.weight", 2),
            ("l.1.q_conv1d.weight", 4),
            ("l.1.k_conv1d.weight", 2),
            ("l.0.mlp.gate_up_proj.weight", 10),
            ("l.0.q_conv1d.weight_scale", 1),  # a name boundary: not a source of the converter
        ]
    }
    out, concatenated, chunked = row_blocks.forward(table, (concatenate, chunk))
    assert sorted(out) == [
        "l.0.conv1d.weight", "l.0.mlp.gate_proj.weight", "l.0.mlp.up_proj.weight", "l.0.q_conv1d.weight_scale",
        "l.1.conv1d.weight",
    ]  # fmt: skip
    assert concatenated["l.0.conv1d.weight"] == RowBlocks((("l.0.q_conv1d.weight", 4), ("l.0.k_conv1d.weight", 2)))
    assert chunked == {
        "l.0.mlp.gate_up_proj.weight": RowBlocks((("l.0.mlp.gate_proj.weight", 5), ("l.0.mlp.up_proj.weight", 5)))
    }
    back = row_blocks.reverse(out, concatenated, chunked)
    assert {n: (t.shape, _runs(t)) for n, t in back.items()} == {n: (t.shape, _runs(t)) for n, t in table.items()}


def test_a_missing_part_is_refused():
    concatenate = ConverterRecord(
        "WeightConverter", ("q_conv1d.weight", "k_conv1d.weight"), ("conv1d.weight",), (("Concatenate", {"dim": 0}),)
    )
    with pytest.raises(SourceError, match="lacks"):
        row_blocks.forward({"l.0.q_conv1d.weight": _stored("l.0.q_conv1d.weight", 4, "a")}, (concatenate,))


def test_which_converters_are_replayed():
    def converters(model_type: str) -> list[ConverterRecord]:
        return list(builtin_plan(model_type, "5.23").key_converters)

    for model_type in (*CONCATENATED, *CHUNKED, "qwen3_moe", "mixtral"):
        assert all(replayable(c) for c in converters(model_type)), model_type
    inverse = ConverterRecord("WeightConverter", ("a",), ("b",), (("Interleave", {"dim": 1, "inverse": True}),))
    assert not replayable(inverse)
    dim1 = ConverterRecord("WeightConverter", ("a.weight", "b.weight"), ("ab.weight",), (("Concatenate", {"dim": 1}),))
    assert not row_blocks.replays(dim1)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    from tests.helpers.tester_configs import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("row_blocks")
    out = {}
    for model_type in (*CONCATENATED, *CHUNKED):
        source = make_tiny_checkpoint(model_type, root / model_type)
        reshard.convert(source, root / f"{model_type}-tp2", tp=2, progress=False)
        out[model_type] = (source, root / f"{model_type}-tp2")
    return out


@pytest.mark.parametrize("model_type", CONCATENATED + CHUNKED)
def test_rank_files_hold_what_transformers_converts(artifacts, model_type: str):
    """Every tensor a rank file holds whole (conv1d is unplanned; hrm_text's projections gathered over the ranks)
    equals transformers' own load of the checkpoint, its converters applied."""
    from transformers import AutoModelForCausalLM

    source, artifact = artifacts[model_type]
    manifest = read_manifest(artifact)
    options = manifest.options
    assert options.concatenated if model_type in CONCATENATED else options.chunked, options
    reference = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).state_dict()
    ranks = [load_file(artifact / manifest.rank_file(rank).path) for rank in range(2)]
    converted = list(options.concatenated or {}) + [n for r in (options.chunked or {}).values() for n, _ in r.parts]
    for entry in manifest.tensors:
        if entry.name not in converted:
            continue
        if entry.placement.kind in ("plain", "replicate"):
            local = ranks[0][entry.name]
        else:
            local = torch.cat([ranks[r][entry.name] for r in range(2)], dim=entry.placement.dim or 0)
        assert torch.equal(local, reference[entry.name]), entry.name


@pytest.mark.parametrize("model_type", CONCATENATED + CHUNKED)
def test_consolidate_gives_the_checkpoint_back(artifacts, tmp_path: Path, model_type: str):
    source, artifact = artifacts[model_type]
    consolidate(artifact, tmp_path / "back", progress=False)
    original, back = tensors_of(source), tensors_of(tmp_path / "back")
    assert sorted(back) == sorted(original)  # q/k/v_conv1d, gqkv_proj: the checkpoint's own keys
    for name, tensor in original.items():
        assert torch.equal(back[name].view(torch.uint8), tensor.view(torch.uint8)), name


def test_reshard_keeps_the_records(artifacts, tmp_path: Path):
    """An artifact re-sharded at tp 1 keeps the records; consolidating it gives the checkpoint back."""
    source, artifact = artifacts["hrm_text"]
    manifest = reshard.convert(artifact, tmp_path / "tp1", tp=1, progress=False)
    assert manifest.options == read_manifest(artifact).options
    consolidate(tmp_path / "tp1", tmp_path / "back", progress=False)
    original, back = tensors_of(source), tensors_of(tmp_path / "back")
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[k], v) for k, v in original.items())


def test_checkpoint_keys_name_the_checkpoint_tensors():
    options = Transforms(
        key_renames=((r"\.attention\.", ".self_attn."),),
        concatenated={"l.self_attn.conv1d.weight": RowBlocks((("l.self_attn.q_conv1d.weight", 2),))},
        chunked={"l.attn.gqkv.weight": RowBlocks((("l.q.weight", 1), ("l.k.weight", 1)))},
    )
    names = ["l.self_attn.conv1d.weight", "l.q.weight", "l.k.weight", "l.norm.weight"]
    assert options.checkpoint_keys(names) == ["l.attention.q_conv1d.weight", "l.attn.gqkv.weight", "l.norm.weight"]


def _edited(artifact: Path, tmp_path: Path, edit) -> Path:
    folder = tmp_path / "edited"
    shutil.copytree(artifact, folder)
    data = json.loads((folder / "manifest.json").read_text())
    edit(data["options"])
    (folder / "manifest.json").write_text(json.dumps(data))
    return folder


def _first(records: dict) -> list:
    return records[sorted(records)[0]]


@pytest.mark.parametrize(
    ("model_type", "edit", "message"),
    [
        ("olmo_hybrid", lambda o: _first(o["concatenated"])[0].__setitem__(1, 7),
         r"options\.concatenated\..*rows do not make"),
        ("olmo_hybrid", lambda o: _first(o["concatenated"])[0].__setitem__(1, "8"), r"options\.concatenated must map"),
        ("olmo_hybrid", lambda o: _first(o["concatenated"])[0].__setitem__(1, True), r"options\.concatenated must map"),
        ("olmo_hybrid", lambda o: o["concatenated"].update(x=o["concatenated"].pop(sorted(o["concatenated"])[0])),
         r"options\.concatenated\.x: 'x' is not a tensor"),
        ("olmo_hybrid", lambda o: _first(o["concatenated"])[0].__setitem__(0, "model.norm.weight"),
         "also a tensor of this manifest"),
        ("hrm_text", lambda o: _first(o["chunked"])[1].__setitem__(1, 3), r"options\.chunked\..*\[1\]: 3 rows"),
        ("hrm_text", lambda o: _first(o["chunked"])[0].__setitem__(0, "nope"), r"\[0\]: 'nope' is not a tensor"),
        ("hrm_text", lambda o: _first(o["chunked"]).append(_first(o["chunked"])[0]), "is cut from"),
        ("hrm_text", lambda o: o.update(chunked=[]), r"options\.chunked must map"),
    ],
)  # fmt: skip
def test_bad_records_are_refused_naming_the_field(artifacts, tmp_path: Path, model_type: str, edit, message: str):
    folder = _edited(artifacts[model_type][1], tmp_path, edit)
    with pytest.raises(ManifestError, match=message) as caught:
        read_manifest(folder)
    assert len(str(caught.value).splitlines()) == 1


@pytest.mark.parametrize("model_type", CONCATENATED + CHUNKED)
def test_manifest_round_trips_and_follows_the_schema(artifacts, model_type: str):
    from importlib import resources

    from reshard.manifests import Manifest

    text = (artifacts[model_type][1] / "manifest.json").read_text()
    assert Manifest.from_json(text).to_json() == text
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((resources.files("reshard.manifests") / "manifest.schema.json").read_text())
    jsonschema.validate(json.loads(text), schema)
