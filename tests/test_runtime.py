"""The runtime in one process (tp=1 artifacts, and every error that must raise before any process group exists)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reshard.loaders import load_state_dict
from reshard.manifests import read_manifest
from reshard.manifests.errors import IntegrityError, ManifestError, MeshError, ReshardError
from reshard.manifests.manifest import manifest_digest
from reshard.manifests.safetensors import read_header
from tests.helpers.memory import mapped_file

QWEN = {"num_attention_heads": 8, "num_key_value_heads": 4}


def copy_artifact(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def rank_file(artifact: Path, rank: int = 0) -> Path:
    return artifact / read_manifest(artifact).rank_file(rank).path


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_import_pulls_in_neither_transformers_nor_the_offline_stage() -> None:
    code = (
        "import sys, torch\n"
        "before = set(sys.modules)\n"
        "import reshard.loaders\n"
        "print('\\n'.join(sorted(set(sys.modules) - before)))\n"
    )
    added = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    heavy = {"click", "tqdm", "huggingface_hub", "transformers", "xxhash", "accelerate"}
    assert not [m for m in added if m.split(".")[0] in heavy]
    offline = [
        m for m in added if m.startswith("reshard.") and not m.startswith(("reshard.loaders", "reshard.manifests"))
    ]
    assert not offline


def test_tp1_state_dict_is_the_checkpoint_as_views_of_the_mapped_file(tiny) -> None:
    artifact = tiny.artifact("qwen2", tp=1, **QWEN)
    state = load_state_dict(artifact)
    expected = source_tensors(tiny.checkpoint("qwen2", **QWEN))
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        assert type(tensor) is torch.Tensor and torch.equal(tensor, expected[name]), name
        # zero-copy: the bytes are in the mapping of the rank file itself, not in anonymous memory
        assert mapped_file(tensor) == rank_file(artifact).resolve(), name


def test_tp1_model_equals_transformers(tiny) -> None:
    from transformers import AutoModelForCausalLM

    from reshard.loaders import load_model

    source, artifact = tiny.checkpoint("llama_tied"), tiny.artifact("llama_tied", tp=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = AutoModelForCausalLM.from_pretrained(source)
        ours = load_model(artifact)
    assert type(ours) is type(theirs) and not ours.training and ours.dtype == theirs.dtype == torch.bfloat16
    ours_params = dict(ours.named_parameters(remove_duplicate=False))
    for name, param in theirs.named_parameters(remove_duplicate=False):
        assert torch.equal(param, ours_params[name]) and param.requires_grad == ours_params[name].requires_grad
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    for name, buffer in theirs.named_buffers():
        assert torch.equal(buffer, ours.get_buffer(name)), name
    prompt = torch.tensor([[1, 5, 77, 900, 1000, 3]])
    with torch.no_grad():
        assert torch.equal(theirs(prompt).logits, ours(prompt).logits)
    tokens = theirs.generate(prompt, max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, ours.generate(prompt, max_new_tokens=5, do_sample=False))
    assert mapped_file(ours.model.norm.weight) == rank_file(artifact).resolve()


def test_no_manifest(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no manifest"):
        load_state_dict(tmp_path)


def test_manifest_of_another_format_version(tiny, tmp_path: Path) -> None:
    artifact = copy_artifact(tiny.artifact("qwen2", tp=1, **QWEN), tmp_path / "art")
    data = json.loads((artifact / "manifest.json").read_text())
    data["format_version"] = 99
    (artifact / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format version 99"):
        load_state_dict(artifact)


@pytest.mark.parametrize("path", ["../elsewhere.safetensors", "/etc/passwd", "link.safetensors"])
def test_manifest_path_leaving_the_artifact(tiny, tmp_path: Path, path: str) -> None:
    artifact = copy_artifact(tiny.artifact("qwen2", tp=1, **QWEN), tmp_path / "art")
    shutil.copy(rank_file(artifact), tmp_path / "outside.safetensors")
    (artifact / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    data = json.loads((artifact / "manifest.json").read_text())
    data["files"][0]["path"] = path
    (artifact / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"(outside|leaves) the artifact"):
        load_state_dict(artifact)


def test_truncated_rank_file(tiny, tmp_path: Path) -> None:
    artifact = copy_artifact(tiny.artifact("qwen2", tp=1, **QWEN), tmp_path / "art")
    path = rank_file(artifact)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(IntegrityError, match=rf"{path.name}.*truncated"):
        load_state_dict(artifact)


def test_missing_rank_file(tiny, tmp_path: Path) -> None:
    artifact = copy_artifact(tiny.artifact("qwen2", tp=1, **QWEN), tmp_path / "art")
    rank_file(artifact).unlink()
    with pytest.raises(IntegrityError, match="missing"):
        load_state_dict(artifact)


def test_verify_names_the_tensor_and_file_of_a_flipped_byte(tiny, tmp_path: Path) -> None:
    artifact = copy_artifact(tiny.artifact("qwen2", tp=1, **QWEN), tmp_path / "art")
    path = rank_file(artifact)
    name = "model.layers.1.self_attn.k_proj.bias"
    offset = read_header(path).tensors[name].offset + 1
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    assert torch.is_tensor(load_state_dict(artifact)[name])  # unverified, the flip goes unnoticed
    with pytest.raises(IntegrityError, match=rf"{path.name}: tensor '{name}' has xxh3"):
        load_state_dict(artifact, verify=True)
    intact = tiny.artifact("qwen2", tp=1, **QWEN)
    assert len(load_state_dict(intact, verify=True)) == len(read_manifest(intact).tensors)


def test_header_disagreeing_with_the_manifest(tiny, tmp_path: Path) -> None:
    artifact = copy_artifact(tiny.artifact("qwen2", tp=1, **QWEN), tmp_path / "art")
    rank_file = artifact / read_manifest(artifact).rank_file(0).path
    data = rank_file.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    name = next(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    header[name]["shape"] = [header[name]["shape"][0] * header[name]["shape"][1]]  # same bytes, another shape
    encoded = json.dumps(header).encode()
    encoded += b" " * (-(8 + len(encoded)) % 8)
    rank_file.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data[8 + length :])
    with pytest.raises(IntegrityError, match="but the manifest records"):
        load_state_dict(artifact)


def test_sharded_artifact_in_a_single_process_says_how_to_launch(tiny) -> None:
    with pytest.raises(MeshError, match=r"tp=2.*torchrun --nproc-per-node 2"):
        load_state_dict(tiny.artifact("qwen2", tp=2, **QWEN))


def test_dtype_must_match_what_the_artifact_stores(tiny) -> None:
    artifact = tiny.artifact("qwen2", tp=1, **QWEN)  # float32
    assert load_state_dict(artifact, dtype="float32")
    assert load_state_dict(artifact, dtype=torch.float32)
    # another floating dtype casts as from_pretrained(dtype=...) does (copies; `reshard --dtype` keeps views)
    assert load_state_dict(artifact, dtype=torch.bfloat16)["lm_head.weight"].dtype == torch.bfloat16
    with pytest.raises(ReshardError, match="dtype must be"):
        load_state_dict(artifact, dtype="float33")


def test_accelerator_path_builds_every_tensor_from_one_device_buffer(tiny) -> None:
    """Off CPU the file's data is copied into one device buffer; the views must keep each tensor's shape and dtype."""
    from reshard.loaders.rank_file import map_rank_file

    artifact = tiny.artifact("qwen2", tp=1, **QWEN)
    manifest = read_manifest(artifact)
    on_cpu = map_rank_file(artifact, manifest, 0, device=torch.device("cpu"), verify=False)
    on_meta = map_rank_file(artifact, manifest, 0, device=torch.device("meta"), verify=False)
    assert {n: (t.shape, t.dtype) for n, t in on_meta.items()} == {n: (t.shape, t.dtype) for n, t in on_cpu.items()}
    assert {t.device.type for t in on_meta.values()} == {"meta"}


def test_expert_parallel_artifact_is_refused_clearly(tiny, tmp_path: Path) -> None:
    artifact = copy_artifact(tiny.artifact("qwen2", tp=1, **QWEN), tmp_path / "art")
    data = json.loads((artifact / "manifest.json").read_text())
    data["expert_mesh"] = {"ep": 1}
    data["manifest_xxh3"] = manifest_digest(data)  # sealed again: the content is a manifest this reshard can read
    (artifact / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(MeshError, match="tensor-parallel artifacts only"):
        load_state_dict(artifact)
