"""Nothing in a manifest is trusted: each attack of issue 10 is refused with one line and exit 6, never a traceback.

The attacks edit ``manifest.json`` and, where the edit keeps the digest, re-seal it (``manifest_xxh3`` recomputed),
so that each check is shown to catch it on its own and not only through the digest.
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import reshard
from reshard.cli import main
from reshard.manifests import read_manifest
from reshard.manifests.errors import IntegrityError, ManifestError
from reshard.manifests.manifest import DIGEST_FIELD, manifest_digest
from tests.helpers.checkpoints import make_checkpoint

Edit = Callable[[dict[str, Any]], None]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    reshard.convert(make_checkpoint("llama", root / "src"), root / "art", tp=2, progress=False)
    return root / "art"


def sealed(data: dict[str, Any]) -> str:
    """The manifest with its digest recomputed: an edit only the structural checks can catch."""
    data[DIGEST_FIELD] = manifest_digest(data)
    return json.dumps(data)


def tensor(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in data["tensors"] if t["name"] == name)


def swap_ranges(data: dict[str, Any]) -> None:
    slices = tensor(data, "lm_head.weight")["slices"]
    slices[0]["ranges"], slices[1]["ranges"] = slices[1]["ranges"], slices[0]["ranges"]


def set_tp(size: int) -> Edit:
    return lambda data: data.update(mesh={"tp": size})


ATTACKS: dict[str, tuple[Edit, str]] = {
    "swapped ranges": (swap_ranges, r"tensors\[\d+\]\.slices\[0\]\.ranges"),
    "shape 9999": (lambda d: tensor(d, "lm_head.weight").update(shape=[9999, 256]), r"tensors\[\d+\]\.slices\[0\]"),
    "shape -1": (lambda d: tensor(d, "lm_head.weight").update(shape=[-1, 256]), r"shape\[0\]: -1 is out of range"),
    "placement dim": (lambda d: tensor(d, "lm_head.weight")["placement"].update(dim=1), r"placement"),
    "style": (lambda d: tensor(d, "lm_head.weight").update(style="rowwise"), r"placement"),
    "missing tensor": (lambda d: d["tensors"].pop(3), "content does not match its digest"),
    "mesh list": (lambda d: d.update(mesh=[2]), r"mesh: expected an object, got \[2\]"),
    "rank string": (lambda d: d["files"][0].update(rank="0"), r'files\[\d+\]\.rank: expected an integer, got "0"'),
    "rank bool": (lambda d: tensor(d, "lm_head.weight")["slices"][0].update(rank=False), "expected an integer"),
    "size string": (lambda d: d["files"][0].update(size="5"), r"files\[\d+\]\.size: expected an integer"),
    "tp 10**12": (set_tp(10**12), r"mesh\.tp: 1000000000000 is out of range"),
    "tp 3": (set_tp(3), r"do not cover world size 3"),
    "path dot": (lambda d: d["files"][0].update(path="."), "not a file path inside the artifact"),
    "path of a folder": (lambda d: d["files"][0].update(path="sub"), "names a folder"),
    "file too small": (lambda d: d["files"][0].update(size=9), r"cannot hold rank"),
    "unknown dtype": (lambda d: tensor(d, "lm_head.weight").update(dtype="F128"), "unknown dtype"),
}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_attack_exits_6_with_one_line(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, command: str
) -> None:
    edit, message = ATTACKS[name]
    copy = Path(shutil.copytree(artifact, tmp_path / "art"))
    (copy / "sub").mkdir()
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    (copy / "manifest.json").write_text(sealed(data) if name != "missing tensor" else json.dumps(data))
    code, err = run_cli([command, "-q", str(copy)] if command == "verify" else [command, str(copy)], capsys)
    assert code == 6, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "manifest.json" in err
    with pytest.raises(ManifestError, match=message):
        read_manifest(copy)


def test_non_utf8_and_any_unsealed_edit(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    copy = Path(shutil.copytree(artifact, tmp_path / "art"))
    raw = (copy / "manifest.json").read_bytes()
    (copy / "manifest.json").write_bytes(raw.replace(b'"llama"', b'"ll\xffma"', 1))
    code, err = run_cli(["inspect", str(copy)], capsys)
    assert code == 6 and "not UTF-8" in err and "Traceback" not in err
    (copy / "manifest.json").write_bytes(raw.replace(b'"LlamaForCausalLM"', b'"LlamaForCausalLN"', 1))
    with pytest.raises(ManifestError, match="content does not match its digest"):
        read_manifest(copy)
    (copy / "manifest.json").write_bytes(raw.replace(b"\n", b"\n  "))  # formatting is not content
    assert read_manifest(copy).to_json() == raw.decode()


def rewrite_metadata(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Re-encode a rank file's header (same length, padded with spaces) after ``change`` to its JSON."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    change(header)
    encoded = json.dumps(header, separators=(",", ":")).encode()
    assert len(encoded) <= length
    path.write_bytes(raw[:8] + encoded.ljust(length) + raw[8 + length :])


def test_rank_file_of_another_artifact_is_refused_at_load(artifact: Path, tmp_path: Path) -> None:
    from reshard.loaders.rank_file import map_rank_file
    from reshard.manifests import resolve_in

    copy = Path(shutil.copytree(artifact, tmp_path / "art"))
    manifest = read_manifest(copy)
    path = resolve_in(copy, manifest.rank_file(0).path)
    rewrite_metadata(path, lambda h: h["__metadata__"].update({"reshard.artifact": "0" * 32}))
    import torch

    with pytest.raises(IntegrityError, match="rank file belongs to another artifact"):
        map_rank_file(copy, manifest, 0, device=torch.device("cpu"), verify=False)


def test_swapped_offsets_name_the_field(artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Two same-size tensors' data_offsets swapped: shapes agree, the file hash does not; verify and load both say
    which tensor's ``data_offsets`` are wrong."""
    import torch

    from reshard.commands.verify import verify_artifact
    from reshard.loaders.rank_file import map_rank_file

    copy = Path(shutil.copytree(artifact, tmp_path / "art"))
    manifest = read_manifest(copy)
    first, second = "model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"

    def swap(header: dict[str, Any]) -> None:
        header[first]["data_offsets"], header[second]["data_offsets"] = (
            header[second]["data_offsets"],
            header[first]["data_offsets"],
        )

    rewrite_metadata(copy / manifest.rank_file(1).path, swap)
    problems = verify_artifact(copy)
    assert any(f"tensor {first!r}: data_offsets" in p for p in problems), problems
    with pytest.raises(IntegrityError, match="data_offsets"):
        map_rank_file(copy, manifest, 1, device=torch.device("cpu"), verify=False)
    code, err = run_cli(["verify", "-q", str(copy)], capsys)
    assert code == 7 and "data_offsets" in err and "Traceback" not in err
