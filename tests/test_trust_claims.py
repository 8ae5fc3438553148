"""Records are checked against what they claim: forged records in a re-digested manifest are refused everywhere.

The manifest's digest is a self-hash anyone who can write the folder recomputes, so each attack below edits a
record and re-seals the manifest (and, for config.json, its file entry). Each must be refused with one line naming
the field, with ManifestError's exit code, by ``reshard verify``, by consolidate and re-shard (nothing written),
and by ``load_model``. Where a forgery keeps the manifest self-consistent by lying about slice hashes too, the
bytes give it away: verify and the commands that read every byte refuse it (IntegrityError).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import reshard
from reshard.cli import main
from reshard.loaders import load_model
from reshard.loaders.rank_file import map_rank_file
from reshard.manifests import read_manifest
from reshard.manifests.errors import IntegrityError, ManifestError
from reshard.manifests.hashing import hash_file
from reshard.manifests.manifest import DIGEST_FIELD, manifest_digest
from tests.helpers.checkpoints import make_checkpoint

Edit = Callable[[dict[str, Any]], None]
LAYER0 = "model.layers.0."


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny llama (4 heads, 2 KV heads of 16 rows) at tp=2, and one (2 KV heads of 8 rows) with its KV heads
    replicated for tp=4."""
    root = tmp_path_factory.mktemp("claims")
    reshard.convert(make_checkpoint("llama", root / "src"), root / "plain", tp=2, progress=False)
    source = make_checkpoint("llama_gqa8", root / "src-gqa", num_key_value_heads=2)
    reshard.convert(source, root / "kv", tp=4, replicate_kv=True, progress=False)
    return {"plain": root / "plain", "kv": root / "kv"}


def tensor(data: dict[str, Any], name: str) -> dict[str, Any]:
    return next(t for t in data["tensors"] if t["name"] == name)


def forged(artifact: Path, folder: Path, edit: Edit) -> Path:
    """A copy of ``artifact`` with ``edit`` applied to its manifest, re-sealed (the digest recomputed)."""
    copy = Path(shutil.copytree(artifact, folder))
    data = json.loads((copy / "manifest.json").read_text())
    edit(data)
    data[DIGEST_FIELD] = manifest_digest(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


def plan_only(data: dict[str, Any]) -> None:
    data["plan"]["lm_head"] = "colwise"


def plan_and_style(data: dict[str, Any]) -> None:
    plan_only(data)
    tensor(data, "lm_head.weight")["style"] = "colwise"


def two_names_to_one(data: dict[str, Any]) -> None:
    data["options"]["key_renames"] = [["^model\\.layers\\.1\\.", LAYER0]]


def kv_record(original: int, replicated: int, head_dim: int = 16) -> Edit:
    def edit(data: dict[str, Any]) -> None:
        data["options"]["replicate_kv"] = {
            "original_kv_heads": original,
            "replicated_kv_heads": replicated,
            "head_dim": head_dim,
        }

    return edit


def chunked(data: dict[str, Any]) -> None:
    mlp = LAYER0 + "mlp."
    parts = [[mlp + "gate_proj.weight", 96], [mlp + "up_proj.weight", 96]]
    data["options"]["chunked"] = {mlp + "gate_up_proj.weight": parts}


def concatenated(data: dict[str, Any]) -> None:
    mlp = LAYER0 + "mlp."
    data["options"]["concatenated"] = {mlp + "gate_proj.weight": [[mlp + "g1.weight", 48], [mlp + "g2.weight", 48]]}


def interleaved(data: dict[str, Any]) -> None:
    record = {"source": LAYER0 + "mlp.w13.weight", "dim": 0, "blocks": [48, 48]}
    data["options"]["interleaved"] = {LAYER0 + "mlp.gate_proj.weight": record}


def no_plan(data: dict[str, Any]) -> None:
    """An empty custom plan and every tensor unplanned (placement plain, the whole tensor on every rank)."""
    data.update(plan={}, plan_overrides={})
    for entry in data["tensors"]:
        entry.update(style=None, placement={"kind": "plain"})
        for piece in entry["slices"]:
            piece.update(ranges=[[0, entry["shape"][0]]] if entry["shape"] else [], shape=entry["shape"])


ATTACKS: dict[str, tuple[str, Edit, str]] = {
    "plan only (lm_head colwise)": ("plain", plan_only, r"tensors\[\d+\]\.style: \"colwise_gather_output\""),
    "plan and style": ("plain", plan_and_style, r"plan\.lm_head: \"colwise\", but model_type 'llama'"),
    "rename two names to one": ("plain", two_names_to_one, r"options\.key_renames"),
    "replicate_kv over distinct heads": ("plain", kv_record(1, 2), r"tensors\[\d+\]\.slices\[1\]\.xxh3"),
    "replicate_kv 2 -> 4 recorded as 1 -> 4": ("kv", kv_record(1, 4, head_dim=8), r"tensors\[\d+\]\.slices\[2\]\.xxh3"),
    "replicate_kv not what tp needs": ("plain", kv_record(1, 1), r"options\.replicate_kv: 1 → 1 KV heads"),
    "chunked gate/up on llama": ("plain", chunked, r"options\.chunked\..*no Chunk converter of 'llama'"),
    "concatenated on llama": ("plain", concatenated, r"options\.concatenated\..*no Concatenate converter"),
    "interleaved on llama": ("plain", interleaved, r"options\.interleaved\..*no Interleave converter"),
    "empty plan, every tensor whole": ("plain", no_plan, r"plan: empty at tp=2"),
    "model_type not the config's": (
        "plain",
        lambda data: data.update(model_type="mistral"),
        r"model_type: \"mistral\", but config\.json says \"llama\"",
    ),
}


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), capsys.readouterr().err


def refused_everywhere(
    copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], message: str, code: int = ManifestError.exit_code
) -> None:
    """``verify``, consolidate and re-shard exit with ``code`` in one line matching ``message`` and write nothing;
    for a manifest refused on its own, ``load_model`` raises the same before it needs a mesh."""
    commands = {
        "verify": ["verify", "-q", str(copy)],
        "consolidate": ["consolidate", str(copy), "-o", str(tmp_path / "consolidated"), "-q"],
        "re-shard": ["--tp", "1", str(copy), "-o", str(tmp_path / "resharded"), "-q"],
    }
    for name, args in commands.items():
        exit_code, err = run_cli(args, capsys)
        lines = [line for line in err.strip().splitlines() if not line.startswith(f"reshard: {copy}/")]
        assert exit_code == code, (name, err)
        assert "Traceback" not in err and len(lines) == 1, (name, err)
        assert re.search(message, err), (name, err)
    assert not (tmp_path / "consolidated").exists() and not (tmp_path / "resharded").exists()
    if code == ManifestError.exit_code:
        with pytest.raises(ManifestError, match=message):
            load_model(copy)


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_a_forged_record_is_refused_naming_its_field(
    artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str
) -> None:
    kind, edit, message = ATTACKS[name]
    copy = forged(artifacts[kind], tmp_path / "art", edit)
    with pytest.raises(ManifestError, match=message):
        read_manifest(copy)
    refused_everywhere(copy, tmp_path, capsys, message)


def test_the_genuine_artifacts_pass(artifacts: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    for artifact in artifacts.values():  # the checks above refuse the forgeries, not every artifact
        assert main(["verify", "-q", str(artifact)]) is None
    assert read_manifest(artifacts["kv"]).options.replicate_kv is not None


def test_config_that_disagrees_with_the_kv_record_is_refused(
    artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """config.json rewritten to the original KV heads (its file entry re-hashed, the manifest re-sealed): the
    stored k/v_proj hold 4 heads, so the record and the config cannot both be true."""
    copy = Path(shutil.copytree(artifacts["kv"], tmp_path / "art"))
    config = json.loads((copy / "config.json").read_text())
    config["num_key_value_heads"] = 2
    (copy / "config.json").write_text(json.dumps(config))
    size, digest = hash_file(copy / "config.json")
    data = json.loads((copy / "manifest.json").read_text())
    next(f for f in data["files"] if f["path"] == "config.json").update(size=size, xxh3=digest)
    data[DIGEST_FIELD] = manifest_digest(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    message = r"options\.replicate_kv: 4 replicated KV heads, but config\.json says num_key_value_heads=2"
    refused_everywhere(copy, tmp_path, capsys, message)


def test_forged_slice_hashes_behind_a_kv_record_are_caught_by_the_bytes(
    artifacts: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The attacker also makes rank 1's k/v_proj slice hashes equal rank 0's, so the record looks like copies: the
    manifest is self-consistent, but no byte agrees with it. Every command that reads the bytes refuses."""

    def edit(data: dict[str, Any]) -> None:
        kv_record(1, 2)(data)
        for entry in data["tensors"]:
            if entry["name"].endswith(("k_proj.weight", "v_proj.weight")):
                entry["slices"][1]["xxh3"] = entry["slices"][0]["xxh3"]

    copy = forged(artifacts["plain"], tmp_path / "art", edit)
    assert read_manifest(copy).options.replicate_kv is not None  # nothing in the manifest alone shows the lie
    refused_everywhere(copy, tmp_path, capsys, r"k_proj\.weight|v_proj\.weight|problem", IntegrityError.exit_code)
    manifest = read_manifest(copy)
    with pytest.raises(IntegrityError, match=r"_proj\.weight' has xxh3"):  # what load_model(verify=True) maps
        map_rank_file(copy, manifest, 1, device=torch.device("cpu"), verify=True)
