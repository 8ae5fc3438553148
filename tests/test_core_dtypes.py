"""The dtype table (``manifests/dtypes.py``): every safetensors dtype, written by safetensors' own writer, is read by
reshard's header reader with safetensors' size and mapped by the runtime to the tensor ``safe_open`` gives; sub-byte
F4 is sized in bits and never cut inside a byte; F8_E8M0 and F4 tensors go through a conversion and the validator
with their bytes where safetensors' slicing puts them."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from reshard.loaders.tensors import map_file, tensor_view, torch_dtype
from reshard.manifests.dtypes import DTYPES, MODEL_DTYPES, STORED_DTYPES, nbytes, row_bytes
from reshard.manifests.errors import FileFormatError, ShardabilityError
from reshard.manifests.layout import file_order, tensor_layout
from reshard.manifests.safetensors import encode_header, read_header

# safetensors' Dtype names that reshard stores (its Rust crate's list, without complex and the fnuz/F6 variants).
SAFETENSORS_NAMES = {
    "BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64",
    "F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4",
}  # fmt: skip


def sample(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """A tensor of safetensors dtype ``name`` and header ``shape``, its bytes distinct (a view of random bytes)."""
    dtype = torch_dtype(name)
    pairs = DTYPES[name].per_torch_element
    torch_shape = (*shape[:-1], shape[-1] // pairs)
    raw = torch.randint(0, 256, (nbytes(name, shape),), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    if name == "BOOL":
        raw = raw % 2  # a bool byte is 0 or 1
    return raw.view(dtype).view(torch_shape)


def test_table_is_every_safetensors_dtype() -> None:
    assert set(DTYPES) == SAFETENSORS_NAMES
    for name, entry in DTYPES.items():
        dtype = torch_dtype(name)
        assert dtype.itemsize * 8 == entry.bits * entry.per_torch_element, name
        assert entry.castable == (name in ("F64", "F32", "F16", "BF16")), name
    assert list(MODEL_DTYPES.items()) == [
        ("F32", "float32"), ("BF16", "bfloat16"), ("F16", "float16"), ("F64", "float64")
    ]  # fmt: skip
    assert list(STORED_DTYPES.items()) == [("auto", None), ("float32", "F32"), ("bfloat16", "BF16"), ("float16", "F16")]


@pytest.mark.parametrize("name", sorted(SAFETENSORS_NAMES))
def test_round_trip_through_safetensors_writer(name: str, tmp_path: Path) -> None:
    """safetensors writes it; reshard's reader gives its name, shape and byte size; the mapped view is the tensor
    safe_open reads (bit for bit)."""
    shape = (3, 4, 6)
    tensor = sample(name, shape)
    path = tmp_path / "x.safetensors"
    save_file({"before": torch.zeros(1, dtype=torch.uint8), "t": tensor}, path)
    entry = read_header(path).tensors["t"]
    assert (entry.dtype, entry.shape, entry.nbytes) == (name, shape, nbytes(name, shape))
    with safe_open(path, "pt") as handle:
        assert handle.get_slice("t").get_dtype() == name
        expected = handle.get_tensor("t")
    view = tensor_view(map_file(path), entry)
    assert view.dtype == expected.dtype and view.shape == expected.shape
    assert torch.equal(view.view(torch.uint8), expected.view(torch.uint8))
    assert torch.equal(view.view(torch.uint8), tensor.view(torch.uint8))


def test_encoded_header_is_safetensors_own(tmp_path: Path) -> None:
    """reshard's header writer sizes every dtype as safetensors does: safe_open reads its file."""
    tensors = {name: sample(name, (2, 4)) for name in sorted(DTYPES)}
    order = sorted(tensors, key=lambda n: (-DTYPES[n].bits, n))
    header = encode_header([(n, n, (2, 4)) for n in order])
    path = tmp_path / "r.safetensors"
    path.write_bytes(header + b"".join(tensors[n].view(torch.uint8).numpy().tobytes() for n in order))
    with safe_open(path, "pt") as handle:
        for name in order:
            assert torch.equal(handle.get_tensor(name).view(torch.uint8), tensors[name].view(torch.uint8)), name


def test_f4_is_sized_in_bits(tmp_path: Path) -> None:
    assert nbytes("F4", (3, 4)) == 6
    assert nbytes("F4", (2, 3)) == 3  # an odd last dim still whole bytes overall: safetensors accepts it
    with pytest.raises(FileFormatError, match="12 bits"):
        nbytes("F4", (3,))
    assert row_bytes("F4", (6, 8), 0) == 4
    with pytest.raises(ShardabilityError, match=r"'w'.*would split bytes"):
        row_bytes("F4", (6, 8), 1, "w")
    raw = json.dumps({"t": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}).encode()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0\0")
    with pytest.raises(FileFormatError, match=r"'t'.*12 bits, not a whole number of bytes"):
        read_header(path)


def test_f4_cut_only_at_whole_bytes() -> None:
    colwise = tensor_layout("w", "F4", (8, 6), "colwise", 2)  # rows of 3 bytes
    assert colwise.local_shapes == ((4, 6), (4, 6)) and colwise.local_nbytes(1) == 12 and colwise.nbytes == 24
    with pytest.raises(ShardabilityError, match="'w'"):
        tensor_layout("w", "F4", (8, 6), "rowwise", 2)  # along the last dim: half bytes
    assert tensor_layout("w", "F4", (2, 8, 6), "colwise", 2).local_shapes == ((2, 4, 6), (2, 4, 6))


def test_file_order_widest_first_by_bits() -> None:
    layouts = [tensor_layout(n, d, (2, 2), None, 1) for n, d in (("a", "F4"), ("b", "U8"), ("c", "F64"), ("d", "I8"))]
    assert [t.name for t in file_order(layouts)] == ["c", "b", "d", "a"]


def reshard_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "reshard", *args], capture_output=True, text=True, timeout=300)


def _replace(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    weights = load_file(path)
    weights.update(tensors)
    save_file(weights, path, metadata={"format": "pt"})


def test_e8m0_and_f4_convert_and_validate(tmp_path: Path) -> None:
    """A checkpoint holding an F8_E8M0 and an F4 tensor (as safetensors writes them) converts at tp 2: the
    manifest validates, each slice is safetensors' own slice of the source, ``verify`` passes, re-sharding to tp 1
    and consolidating give the source's bytes back; an F4 weight cut along its last dim (rowwise) is refused with
    exit 5, naming it. The runtime refuses the F4 artifact in one line (its DTensor shapes are not wired yet)."""
    pytest.importorskip("transformers")
    from reshard.commands.convert import run
    from reshard.manifests import read_manifest
    from reshard.request import ConversionRequest
    from reshard.workers import solo
    from tests.helpers.checkpoints import make_checkpoint

    source = make_checkpoint("llama", tmp_path / "src", max_shard_size="10MB")
    file = source / "model.safetensors"
    with safe_open(file, "pt") as handle:
        up = handle.get_slice("model.layers.0.mlp.up_proj.weight").get_shape()
        gate = handle.get_slice("model.layers.0.mlp.gate_proj.weight").get_shape()
    e8m0, f4 = "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    _replace(file, {e8m0: sample("F8_E8M0", tuple(up)), f4: sample("F4", tuple(gate))})

    out = tmp_path / "tp2"
    run(ConversionRequest(str(source), out, 2, progress=False), solo())
    manifest = read_manifest(out)  # the validator
    entries = {t.name: t for t in manifest.tensors}
    assert (entries[e8m0].dtype, entries[f4].dtype) == ("F8_E8M0", "F4")
    with safe_open(file, "pt") as handle:
        for name in (e8m0, f4):
            whole = handle.get_tensor(name)
            for rank in range(2):
                rank_path = out / manifest.rank_file(rank).path
                entry = read_header(rank_path).tensors[name]
                assert entry.nbytes == entries[name].slice_nbytes(rank) == whole.numel() * whole.itemsize // 2
                with safe_open(rank_path, "pt") as rank_file:
                    local = rank_file.get_tensor(name)
                expected = whole.chunk(2, dim=0)[rank]
                assert torch.equal(local.view(torch.uint8), expected.contiguous().view(torch.uint8)), (name, rank)

    verified = reshard_cli("verify", str(out))
    assert verified.returncode == 0, verified.stderr
    from reshard.loaders.state_dict import check_dtype
    from reshard.manifests.errors import ReshardError

    with pytest.raises(ReshardError, match=f"tensor '{f4}' is F4, which the runtime cannot load yet"):
        check_dtype(manifest, "auto", "tp2")  # pairs per torch element: refused at load, not mis-shaped
    resharded, back = tmp_path / "tp1", tmp_path / "back"  # from the artifact alone, then whole again
    assert reshard_cli("--tp", "1", str(out), "-o", str(resharded), "--quiet").returncode == 0
    consolidated = reshard_cli("consolidate", str(resharded), "-o", str(back), "--quiet")
    assert consolidated.returncode == 0, consolidated.stderr
    with safe_open(file, "pt") as original, safe_open(back / "model.safetensors", "pt") as again:
        assert set(again.keys()) == set(original.keys())
        for name in original.keys():  # noqa: SIM118 (safe_open is no dict)
            assert again.get_slice(name).get_dtype() == original.get_slice(name).get_dtype(), name
            assert torch.equal(again.get_tensor(name).view(torch.uint8), original.get_tensor(name).view(torch.uint8))

    down = "model.layers.0.mlp.down_proj.weight"
    with safe_open(file, "pt") as handle:
        shape = tuple(handle.get_slice(down).get_shape())
    _replace(file, {down: sample("F4", shape)})
    refused = reshard_cli(str(source), "--tp", "2", "-o", str(tmp_path / "refused"), "--quiet")
    assert refused.returncode == 5, refused.stderr
    assert down in refused.stderr and "would split bytes" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
