"""The loaders' options: one record behind keyword-only signatures, the download options reaching a real Hub
endpoint and S3 server on loopback, and ``rank_tensors`` (no mesh, no process group) against what
``load_state_dict`` gives each rank under torchrun."""

from __future__ import annotations

import inspect
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from reshard.loaders import LoadOptions, load_model, load_state_dict, rank_tensors
from reshard.loaders.state_dict import torch_placement
from reshard.manifests import read_manifest
from reshard.manifests.errors import ManifestError, MeshError, StorageError
from tests.helpers.distributed import run_torchrun
from tests.helpers.hub_server import HubServer
from tests.helpers.memory import mapped_file

QWEN = {"num_attention_heads": 8, "num_key_value_heads": 4}
MAIN, V1 = "1" * 40, "2" * 40


def keyword_options(function: Any) -> dict[str, Any]:
    """A function's keyword-only parameters and their defaults, in order."""
    parameters = inspect.signature(function).parameters.values()
    return {p.name: p.default for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def test_the_loaders_take_the_path_positionally_and_every_load_option_by_keyword(tiny: Any) -> None:
    defaults = {name: getattr(LoadOptions(), name) for name in LoadOptions.names()}
    assert list(keyword_options(load_state_dict).items()) == list(defaults.items())
    assert list(keyword_options(load_model).items())[: len(defaults)] == list(defaults.items())
    mesh_free = {name: default for name, default in defaults.items() if name not in ("device_mesh", "dtype")}
    assert keyword_options(rank_tensors) == {"tp": None, **mesh_free}
    for function in (load_state_dict, load_model):
        assert next(iter(inspect.signature(function).parameters)) == "path"
    with pytest.raises(TypeError, match="positional"):
        load_state_dict(tiny.artifact("qwen2", tp=1, **QWEN), None)  # type: ignore[misc]


@pytest.fixture
def hub(tiny: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """``org/tiny`` on a loopback Hub: ``main`` (commit MAIN) and the tag ``v1`` (commit V1) hold two tp 1 artifacts of
    one model with other weights; huggingface_hub's default cache is moved into tmp_path."""
    from huggingface_hub import constants

    server = HubServer()
    server.add("org/tiny", tiny.artifact("llama", tp=1), "main", commit=MAIN)
    server.add("org/tiny", tiny.artifact("llama", tp=1, seed=1), "v1", commit=V1)
    server.start()
    server.use(monkeypatch)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "default-hub-cache"))
    monkeypatch.setenv("RESHARD_CACHE", str(tmp_path / "default-reshard-cache"))
    yield server
    server.stop()


def test_revision_cache_dir_and_token_reach_the_hub(hub: HubServer, tiny: Any, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    state = load_state_dict("hf://org/tiny", revision="v1", cache_dir=cache, token="hf_test_token")
    v1, main = load_state_dict(tiny.artifact("llama", tp=1, seed=1)), load_state_dict(tiny.artifact("llama", tp=1))
    assert state.keys() == v1.keys() and all(torch.equal(state[name], v1[name]) for name in v1)
    assert not all(torch.equal(state[name], main[name]) for name in main)
    # the revision asked for first, then every file pinned to the commit it resolved to; the token on every request
    asked = hub.files("org/tiny")
    assert [(r.method, r.revision) for r in asked[:2]] == [("HEAD", "v1"), ("GET", "v1")]
    assert {r.revision for r in asked[2:]} == {V1} and {r.authorization for r in asked} == {"Bearer hf_test_token"}
    # the files in cache_dir: the Hub's cache, and reshard's folder of hard links to its blobs, from which the
    # tensors are mapped; nothing in the default caches
    snapshot = cache / "models--org--tiny" / "snapshots" / V1
    (folder,) = (cache / "hf" / "org" / "tiny").iterdir()
    name = read_manifest(folder).rank_file(0).path
    assert mapped_file(next(iter(state.values()))) == folder / name and (folder / name).samefile(snapshot / name)
    assert not (tmp_path / "default-hub-cache").exists() and not (tmp_path / "default-reshard-cache").exists()

    hub.requests.clear()
    model = load_model("hf://org/tiny@main", cache_dir=cache, token=False)
    assert all(torch.equal(model.get_parameter(name), main[name]) for name in main)
    asked = hub.files("org/tiny")
    assert {r.revision for r in asked[2:]} == {MAIN} and {r.authorization for r in asked} == {None}


def test_a_revision_that_would_be_ignored_or_contradicts_the_uri_is_refused(hub: HubServer, tiny: Any) -> None:
    with pytest.raises(StorageError, match=r"revision='v1' applies to hf:// artifacts only"):
        load_state_dict(tiny.artifact("llama", tp=1), revision="v1")
    with pytest.raises(StorageError, match=r"hf://org/tiny@main: revision='v1' contradicts the URI's @main"):
        load_state_dict("hf://org/tiny@main", revision="v1")
    assert not hub.files("org/tiny")  # refused before anything was asked
    with pytest.raises(StorageError, match=r"hf://org/tiny@nope/manifest.json: cannot download"):
        load_state_dict("hf://org/tiny", revision="nope")


def test_cache_dir_reaches_the_bucket_fetch(s3_server: Any, tiny: Any, tmp_path: Path, monkeypatch: Any) -> None:
    from reshard.commands.publish import publish
    from tests.helpers.s3_server import fresh_bucket

    _, bucket = fresh_bucket(s3_server, monkeypatch, tmp_path, "options")  # RESHARD_CACHE: tmp_path / "cache"
    artifact = tiny.artifact("llama", tp=1)
    uri = publish(artifact, f"s3://{bucket}/tiny", progress=False)
    state = load_state_dict(uri, cache_dir=tmp_path / "mine")
    files = list((tmp_path / "mine" / "s3" / bucket / "tiny").glob("*/" + read_manifest(artifact).rank_file(0).path))
    assert len(files) == 1 and mapped_file(next(iter(state.values()))) == files[0].resolve()
    assert not (tmp_path / "cache").exists()


@pytest.fixture(scope="module")
def under_torchrun(tiny: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tp 2 artifact and what ``load_state_dict`` gave each of 2 torchrun ranks (local tensors and placements)."""
    artifact = tiny.artifact("family_starcoder2", tp=2)  # rowwise biases: Replicate, beside Shard and plain tensors
    out = tmp_path_factory.mktemp("torchrun")
    run_torchrun(Path(__file__).parent / "workers" / "dump_local_tensors.py", str(artifact), str(out), nproc=2)
    return artifact, out


@pytest.mark.parametrize("rank", [0, 1])
def test_rank_tensors_without_a_process_group_equal_load_state_dict_under_torchrun(
    under_torchrun: tuple[Path, Path], rank: int
) -> None:
    artifact, out = under_torchrun
    part = rank_tensors(artifact, rank)
    assert not dist.is_initialized()
    expected = load_file(out / f"rank{rank}.safetensors")
    placements = json.loads((out / f"rank{rank}.json").read_text())
    assert part.tensors.keys() == expected.keys() == part.entries.keys()
    for name, tensor in part.tensors.items():
        assert type(tensor) is torch.Tensor and tensor.dtype == expected[name].dtype, name
        assert torch.equal(tensor, expected[name]), name
        placement = part.placements[name]
        assert placements[name] == (None if placement.kind == "plain" else [str(torch_placement(placement, name))])
    assert {placement.kind for placement in part.placements.values()} == {"shard", "replicate", "plain"}
    assert mapped_file(part.tensors[name]) == (artifact / read_manifest(artifact).rank_file(rank).path).resolve()


def test_rank_tensors_at_another_tp_and_its_refusals(tiny: Any) -> None:
    artifact, whole = tiny.artifact("qwen2", tp=2, **QWEN), tiny.artifact("qwen2", tp=1, **QWEN)
    cut = rank_tensors(artifact, 0, tp=1)  # every tensor cut from both rank files, as at tp 1
    expected = rank_tensors(whole, 0).tensors
    assert cut.tp == 1 and cut.tensors.keys() == expected.keys()
    assert all(torch.equal(cut.tensors[name], expected[name]) for name in expected)
    with pytest.raises(ManifestError, match="no file for rank 2"):
        rank_tensors(artifact, 2)
    with pytest.raises(MeshError, match="rank 4 is not a rank of tp=4"):
        rank_tensors(artifact, 4, tp=4)
    with pytest.raises(MeshError, match=r"cannot load at tp=3: .*it loads on"):
        rank_tensors(artifact, 0, tp=3)
