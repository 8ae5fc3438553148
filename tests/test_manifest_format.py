"""The manifest format: its JSON Schema describes what convert writes; unsafe or foreign manifests are refused."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import reshard
from reshard.manifests import Manifest, read_manifest
from reshard.manifests.errors import ManifestError
from tests.helpers.checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def manifests(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("art")
    out = []
    for kind, options in [("qwen2", {}), ("family_qwen3_moe", {"ep": 2}), ("llama_gqa8", {"replicate_kv": True})]:
        overrides = {"num_key_value_heads": 2} if kind == "llama_gqa8" else {}
        source = make_checkpoint(kind, root / kind, **overrides)
        tp = 4 if kind == "llama_gqa8" else 2
        reshard.convert(source, root / f"{kind}-art", tp=tp, progress=False, **options)
        out.append(root / f"{kind}-art" / "manifest.json")
    return out


def test_written_manifests_follow_the_schema(manifests: list[Path]):
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((resources.files("reshard.manifests") / "manifest.schema.json").read_text())
    for path in manifests:
        jsonschema.validate(json.loads(path.read_text()), schema)


def test_round_trip(manifests: list[Path]):
    for path in manifests:
        assert Manifest.from_json(path.read_text()).to_json() == path.read_text()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(format_version=2), "format version 2"),
        (lambda m: m.update(format="something-else"), "not a reshard manifest"),
        (lambda m: m["files"][0].update(path="../../etc/passwd"), "leaves the artifact"),
        (lambda m: m["files"][0].update(path="/etc/passwd"), "leaves the artifact"),
        (lambda m: m["files"].pop(0), "do not cover world size"),
        (lambda m: m.pop("tensors"), "malformed manifest"),
    ],
)
def test_bad_manifests_are_refused(manifests: list[Path], tmp_path: Path, change, message: str):
    data = json.loads(manifests[0].read_text())
    change(data)
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=message):
        read_manifest(tmp_path)


def test_docs_architecture_table_is_current():
    """docs/architectures.md is what scripts/architectures_table.py generates from the plans and the tests."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "architectures_table.py"), "--check"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
