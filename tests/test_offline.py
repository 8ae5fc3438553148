"""The offline stage end to end: reassembly bit for bit, determinism, streaming paths, errors, hub source."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
import xxhash
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file

import reshard
from reshard.cli import cli
from reshard.manifests import read_manifest
from reshard.manifests.errors import FileFormatError, OutputExistsError, PlanError, ReshardError, ShardabilityError
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {kind: make_checkpoint(kind, root / kind) for kind in ("llama", "llama_tied", "qwen2", "llama_mha8")}


def source_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def reassemble(artifact: Path) -> dict[str, torch.Tensor]:
    """Put every rank's pieces back at their global positions, using only the manifest's ranges."""
    manifest = read_manifest(artifact)
    out: dict[str, torch.Tensor] = {}
    rank_files = {f.rank: safe_open(artifact / f.path, framework="pt") for f in manifest.files if f.rank is not None}
    for tensor in manifest.tensors:
        dtype = rank_files[0].get_tensor(tensor.name).dtype
        full = torch.zeros(tensor.shape, dtype=dtype)
        covered = torch.zeros(tensor.shape, dtype=torch.int32)
        for piece in tensor.slices:
            local = rank_files[piece.rank].get_tensor(tensor.name)
            assert tuple(local.shape) == tuple(piece.shape)
            if not tensor.placement.is_sharded:
                assert torch.equal(local, rank_files[0].get_tensor(tensor.name))  # replicated: same everywhere
                full.copy_(local)
                covered += 1 if piece.rank == 0 else 0
                continue
            dim, offset = tensor.placement.dim, 0
            for start, stop in piece.ranges:
                width = stop - start
                full.narrow(dim, start, width).copy_(local.narrow(dim, offset, width))
                covered.narrow(dim, start, width).add_(1)
                offset += width
        assert bool((covered == 1).all()), f"{tensor.name}: every element must come from exactly one rank"
        out[tensor.name] = full
    return out


@pytest.mark.parametrize(("kind", "tp"), [("llama", 2), ("llama_tied", 2), ("qwen2", 2), ("llama_mha8", 4)])
def test_reassembled_slices_equal_source_bit_for_bit(checkpoints: dict[str, Path], tmp_path: Path, kind: str, tp: int):
    out = tmp_path / "art"
    reshard.convert(checkpoints[kind], out, tp=tp, progress=False)
    source = source_tensors(checkpoints[kind])
    rebuilt = reassemble(out)
    assert rebuilt.keys() == source.keys()
    for name, tensor in source.items():
        assert torch.equal(rebuilt[name].view(torch.uint8), tensor.view(torch.uint8)), name
    # config and generation files are carried over verbatim
    assert (out / "config.json").read_bytes() == (checkpoints[kind] / "config.json").read_bytes()


def test_layout_follows_transformers_styles(checkpoints: dict[str, Path], tmp_path: Path):
    manifest = reshard.convert(checkpoints["qwen2"], tmp_path / "art", tp=2, progress=False)
    by_name = {t.name: t for t in manifest.tensors}
    placement = {name: (t.placement.kind, t.placement.dim) for name, t in by_name.items()}
    assert placement["model.layers.0.self_attn.q_proj.bias"] == ("shard", 0)  # colwise bias is sliced
    assert placement["model.layers.0.self_attn.o_proj.weight"] == ("shard", 1)
    assert placement["model.layers.0.input_layernorm.weight"] == ("plain", None)
    assert placement["model.embed_tokens.weight"] == ("shard", 0)
    # vocab 1001 over 2 ranks: torch.chunk semantics, 501 + 500
    assert [s.shape[0] for s in by_name["lm_head.weight"].slices] == [501, 500]


def test_rerun_is_byte_identical(checkpoints: dict[str, Path], tmp_path: Path):
    first = tmp_path / "a"
    second = tmp_path / "b"
    reshard.convert(checkpoints["qwen2"], first, tp=2, progress=False)
    reshard.convert(checkpoints["qwen2"], second, tp=2, progress=False)
    names = sorted(p.name for p in first.iterdir())
    assert names == sorted(p.name for p in second.iterdir())
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


@pytest.mark.parametrize("buffer_bytes", [8, 100, 1000, 5000])
def test_small_buffers_give_the_same_bytes(checkpoints, tmp_path, monkeypatch, buffer_bytes):
    """Tiny buffers force every streaming path: row runs inside one block, gathers across blocks."""
    reference = tmp_path / "ref"
    reshard.convert(checkpoints["llama"], reference, tp=2, progress=False)
    monkeypatch.setattr("reshard.write.rank_files.DEFAULT_BUFFER_BYTES", buffer_bytes)
    small = tmp_path / "small"
    reshard.convert(checkpoints["llama"], small, tp=2, progress=False)
    for path in reference.iterdir():
        assert path.read_bytes() == (small / path.name).read_bytes(), path.name


def test_single_file_checkpoint(tmp_path: Path):
    source = make_checkpoint("llama", tmp_path / "single")
    merged = source_tensors(source)
    for file in source.glob("model*"):
        file.unlink()
    from safetensors.torch import save_file

    save_file(merged, source / "model.safetensors", metadata={"format": "pt"})
    reshard.convert(source, tmp_path / "art", tp=2, progress=False)
    assert reassemble(tmp_path / "art").keys() == merged.keys()


def test_rank_files_are_standard_safetensors(checkpoints: dict[str, Path], tmp_path: Path):
    manifest = reshard.convert(checkpoints["llama"], tmp_path / "art", tp=2, progress=False)
    tensors = load_file(tmp_path / "art" / manifest.rank_file(1).path)
    assert tensors["model.layers.1.mlp.down_proj.weight"].shape == (64, 48)


def test_custom_plan(checkpoints: dict[str, Path], tmp_path: Path):
    plan = tmp_path / "plan.json"
    plan.write_text(
        json.dumps({"model.layers.*.self_attn.q_proj": "colwise", "model.layers.*.mlp.down_proj": "rowwise"})
    )
    manifest = reshard.convert(checkpoints["llama"], tmp_path / "art", tp=2, plan=str(plan), progress=False)
    # transformers merges a plan dict into the model's own (DistributedConfig(tp_plan=...)): other rules are kept
    from reshard.manifests.plans import builtin_plan, plans_version

    assert manifest.transformers_version == plans_version()
    assert manifest.plan == {**builtin_plan("llama", plans_version()).tp_plan, **json.loads(plan.read_text())}
    sharded = sorted({t.name.split(".")[-2] for t in manifest.tensors if t.placement.is_sharded})
    assert sharded == [
        "down_proj",
        "embed_tokens",
        "gate_proj",
        "k_proj",
        "lm_head",
        "o_proj",
        "q_proj",
        "up_proj",
        "v_proj",
    ]


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        ({"model.layers.*.self_attn.q_proj": "diagonal"}, "unknown style 'diagonal'"),
        ({"model.layers.*.self_attn.nope_proj": "colwise"}, "matches no tensor"),
        ({}, "the plan is empty"),  # transformers applies no rule, then refuses tp > 1
    ],
)
def test_bad_custom_plans(checkpoints, tmp_path, plan, message):
    with pytest.raises(PlanError, match=message):
        reshard.convert(checkpoints["llama"], tmp_path / "art", tp=2, plan=plan, progress=False)
    assert not (tmp_path / "art").exists()


def test_preflight_refuses_before_reading_weights(tmp_path: Path):
    source = make_checkpoint("llama", tmp_path / "src")  # 4 heads, 2 KV heads
    for file in source.glob("*.safetensors"):
        file.write_bytes(b"garbage")  # any weight read would fail differently
    with pytest.raises(ShardabilityError, match=r"num_key_value_heads=2 is not divisible by tp=4.*#48307"):
        reshard.convert(source, tmp_path / "art", tp=4, progress=False)
    with pytest.raises(FileFormatError, match="too short to be a safetensors file"):
        reshard.convert(source, tmp_path / "art", tp=2, progress=False)  # a valid tp does read the files
    with pytest.raises(ShardabilityError, match="num_attention_heads=4 is not divisible by tp=3"):
        reshard.convert(source, tmp_path / "art", tp=3, progress=False)


def test_existing_output_needs_overwrite(checkpoints: dict[str, Path], tmp_path: Path):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        reshard.convert(checkpoints["llama"], out, tp=2, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    reshard.convert(checkpoints["llama"], out, tp=2, progress=False, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "manifest.json").exists()


def test_failure_mid_write_leaves_nothing_that_looks_complete(checkpoints, tmp_path, monkeypatch):
    import reshard.write.engine
    import reshard.write.os_calls
    import reshard.write.rank_files

    calls = {"n": 0}
    original = reshard.write.engine.Streamer.copy

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full")
        return original(*args, **kwargs)

    monkeypatch.setattr(reshard.write.engine.Streamer, "copy", failing)
    with pytest.raises(OSError, match="disk full"):
        reshard.convert(checkpoints["llama"], tmp_path / "art", tp=2, progress=False)
    # only the hidden staging folder is left (kept so that a rerun can resume): no artifact, no manifest, and no
    # rank file under its final name, since files are renamed only once complete
    assert sorted(p.name for p in tmp_path.iterdir()) == [".art.partial"]
    assert sorted(p.name for p in (tmp_path / ".art.partial").iterdir()) == [".job"]
    monkeypatch.undo()
    reshard.convert(checkpoints["llama"], tmp_path / "art", tp=2, progress=False)
    assert read_manifest(tmp_path / "art").tp == 2


def test_killed_conversion_leaves_no_complete_looking_artifact(tmp_path: Path):
    """SIGKILL in the middle of writing: no output folder appears; a rerun succeeds."""
    source = make_checkpoint("llama", tmp_path / "src", hidden_size=256, intermediate_size=1024, num_hidden_layers=4)
    script = (
        "import time, reshard.write.engine as w\n"
        "orig = w.Streamer.copy\n"
        "def slow(*a, **k):\n"
        "    time.sleep(0.05); return orig(*a, **k)\n"
        "w.Streamer.copy = slow\n"
        f"import reshard; reshard.convert({str(source)!r}, {str(tmp_path / 'art')!r}, tp=2, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = 60.0
    partial = tmp_path / ".art.partial"
    import time

    start = time.monotonic()
    while not list(partial.glob("rank-*")) and time.monotonic() - start < deadline:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert not (tmp_path / "art").exists()
    assert not (partial / "manifest.json").exists()
    reshard.convert(source, tmp_path / "art", tp=2, progress=False)
    assert not partial.exists()
    assert read_manifest(tmp_path / "art").tp == 2


def reference_hash(path: Path) -> tuple[int, str]:
    """Size and xxh3-128 of a file, computed here independently of reshard's own hashing."""
    data = path.read_bytes()
    return len(data), xxhash.xxh3_128(data).hexdigest()


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reshard", *args], capture_output=True, text=True, timeout=120, env=env or None
    )


def corrupt(folder: Path, how: str) -> str:
    """Damage a copy of a checkpoint; return a fragment the error must contain."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    _name, file_name = sorted(index["weight_map"].items())[0]
    path = folder / file_name
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) - 100])
        return file_name
    if how == "broken_header":
        path.write_bytes(data[:8] + b"{not json" + data[17:])
        return "not valid JSON"
    if how == "lying_header":
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8 : 8 + header_len])
        first = next(k for k in header if k != "__metadata__")
        header[first]["shape"][0] += 1
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (header_len - len(raw))
        assert len(raw) == header_len
        path.write_bytes(data[:8] + raw + data[8 + header_len :])
        return "lies about its size"
    if how == "index_names_missing_tensor":
        index["weight_map"]["model.layers.9.mlp.up_proj.weight"] = file_name
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
        return "model.layers.9.mlp.up_proj.weight"
    if how == "missing_file":
        path.unlink()
        return f"{file_name}: missing"
    raise ValueError(how)


@pytest.mark.parametrize(
    "how", ["truncated", "broken_header", "lying_header", "index_names_missing_tensor", "missing_file"]
)
def test_bad_sources_give_one_line_errors(tmp_path: Path, how: str):
    source = make_checkpoint("llama", tmp_path / "src")
    fragment = corrupt(source, how)
    result = run_cli("--tp", "2", str(source), "-o", str(tmp_path / "art"), "-q")
    damaged = how in ("truncated", "broken_header", "lying_header")  # a damaged file, not a missing source
    assert result.returncode == (12 if damaged else 3), result.stderr
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "art").exists()
    assert not (tmp_path / ".art.partial").exists()


def test_tensor_truncated_in_the_data_is_named(tmp_path: Path):
    """A file cut inside the data section (header intact but lying) names the file and the tensor."""
    source = make_checkpoint("llama", tmp_path / "src")
    files = sorted(source.glob("*.safetensors"))
    data = files[0].read_bytes()
    files[0].write_bytes(data[:-10])
    with pytest.raises(FileFormatError, match=r"tensor '.*' ends at byte .* \(truncated\)"):
        reshard.convert(source, tmp_path / "art", tp=2, progress=False)


def test_cli_convert_verify_inspect(checkpoints: dict[str, Path], tmp_path: Path):
    out = tmp_path / "art"
    result = run_cli("--tp", "2", str(checkpoints["qwen2"]), "-o", str(out), "-q")
    assert result.returncode == 0, result.stderr
    assert run_cli("verify", str(out), "-q").returncode == 0
    text = run_cli("inspect", str(out)).stdout
    assert "Qwen2ForCausalLM" in text and "rank-00001-of-00002.safetensors" in text
    summary = json.loads(run_cli("inspect", str(out), "--json").stdout)
    assert summary["mesh"] == {"tp": 2}
    assert summary["plan"]["model.layers.*.self_attn.o_proj"] == "rowwise"
    assert sum(f["bytes"] for f in summary["rank_files"]) == sum(
        (out / f["path"]).stat().st_size for f in summary["rank_files"]
    )
    assert run_cli("--tp", "2", str(checkpoints["qwen2"]), "-o", str(out), "-q").returncode == 8  # exists


@pytest.mark.parametrize("target", ["rank", "config"])
def test_verify_catches_a_flipped_byte(checkpoints: dict[str, Path], tmp_path: Path, target: str):
    out = tmp_path / "art"
    manifest = reshard.convert(checkpoints["llama"], out, tp=2, progress=False)
    if target == "rank":
        path = out / manifest.rank_file(1).path
        header_len = int.from_bytes(path.read_bytes()[:8], "little")
        data = bytearray(path.read_bytes())
        data[8 + header_len + 1000] ^= 0x01
        path.write_bytes(bytes(data))
    else:
        path = out / "config.json"
        path.write_text(path.read_text().replace("64", "65", 1))
    result = run_cli("verify", str(out), "-q")
    assert result.returncode == 7
    assert path.name in result.stderr
    if target == "rank":
        first_tensor = manifest.tensors[0].name  # offset 1000 lies inside the first tensor of the file
        assert f"tensor {first_tensor!r}" in result.stderr


def test_check_command(checkpoints: dict[str, Path]):
    result = run_cli("check", "--tp", "2", "--tp", "4", str(checkpoints["llama"]))
    assert result.returncode == 5
    assert "tp=2   ok" in result.stdout
    assert "num_key_value_heads=2 is not divisible by tp=4" in result.stdout


def test_help_explains_with_examples():
    for args in (["--help"], ["convert", "--help"], ["verify", "--help"], ["inspect", "--help"], ["check", "--help"]):
        result = run_cli(*args)
        assert result.returncode == 0
        assert "reshard" in result.stdout
    assert "reshard --tp 8 HuggingFaceTB/SmolLM2-1.7B" in run_cli("convert", "--help").stdout


def test_hub_repo_id_goes_through_the_hub_cache(checkpoints: dict[str, Path], tmp_path: Path):
    """A repo id resolves from huggingface_hub's cache layout offline (HF_HUB_OFFLINE=1), recording the commit."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-llama"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in checkpoints["llama"].iterdir():
        (snapshot / file.name).write_bytes(file.read_bytes())
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = run_cli("--tp", "2", "acme/tiny-llama", "-o", str(tmp_path / "art"), "-q", env=env)
    assert result.returncode == 0, result.stderr
    source = read_manifest(tmp_path / "art").source
    assert (source.repo_id, source.commit) == ("acme/tiny-llama", commit)
    missing = run_cli("--tp", "2", "acme/not-cached", "-o", str(tmp_path / "x"), "-q", env=env)
    assert missing.returncode == 3
    assert "acme/not-cached" in missing.stderr and "Traceback" not in missing.stderr


def test_hub_download_asks_only_for_weights_and_configs(monkeypatch, checkpoints, tmp_path):
    seen = {}

    def fake_snapshot_download(repo_id: str, revision: str | None = None, allow_patterns=None, **kwargs):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns)
        return str(checkpoints["llama"])

    def fake_hf_hub_download(repo_id: str, filename: str, revision: str | None = None, **kwargs):
        seen.update(config_revision=revision)
        return str(checkpoints["llama"] / filename)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    monkeypatch.setattr("huggingface_hub.hf_hub_download", fake_hf_hub_download)
    manifest = reshard.convert("acme/tiny", tmp_path / "art", tp=2, revision="v1", progress=False)
    assert seen["repo_id"] == "acme/tiny" and seen["revision"] == seen["config_revision"] == "v1"
    assert "*.safetensors" in seen["allow_patterns"] and "*.bin" not in seen["allow_patterns"]
    assert manifest.source.revision == "v1"


@pytest.mark.parametrize("kind", ["llama", "family_qwen3_moe"])  # in-order reads / fused experts read out of order
def test_manifest_records_every_source_file_hash(tmp_path: Path, kind: str):
    source = make_checkpoint(kind, tmp_path / "src")
    manifest = reshard.convert(source, tmp_path / "art", tp=2, progress=False)
    recorded = {f.path: (f.size, f.xxh3) for f in manifest.source.files}
    assert recorded == {p.name: reference_hash(p) for p in source.iterdir() if p.is_file()}


def test_a_failed_write_on_a_writer_thread_stops_the_conversion(checkpoints, tmp_path, monkeypatch):
    """Rank groups are written by threads of their own: an error on one (a full disk) stops the others and reaches
    the caller, and leaves no artifact."""
    import reshard.write.engine
    import reshard.write.os_calls
    import reshard.write.rank_files

    calls = {"n": 0}
    original = reshard.write.rank_files.RankSink.write
    seen: set[str] = set()

    def failing(self, data):
        seen.add(threading.current_thread().name)
        if self.path.name.startswith("rank-00001"):  # the second of two groups: not the calling thread
            calls["n"] += 1
            if calls["n"] == 20:
                raise OSError(28, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(reshard.write.rank_files.RankSink, "write", failing)
    monkeypatch.setattr(reshard.write.rank_files, "default_threads", lambda ranks: 2)
    with pytest.raises(OSError, match="No space left"):
        reshard.convert(checkpoints["llama"], tmp_path / "art", tp=2, progress=False)
    assert "reshard-writer" in seen
    assert not (tmp_path / "art").exists()
    assert not list((tmp_path / ".art.partial").glob("rank-*"))


def test_tp_below_one_is_refused(checkpoints: dict[str, Path], tmp_path: Path):
    with pytest.raises(ReshardError, match="tp must be a positive integer"):
        reshard.convert(checkpoints["llama"], tmp_path / "art", tp=0, progress=False)
    result = run_cli("--tp", "0", str(checkpoints["llama"]), "-o", str(tmp_path / "art"))
    assert result.returncode == 2 and "Invalid value for '--tp'" in result.stderr
    assert not (tmp_path / "art").exists()


def test_experts_not_divisible_by_ep_are_refused_before_any_weight(tmp_path: Path):
    source = make_checkpoint("family_qwen3_moe", tmp_path / "src", num_key_value_heads=4)  # 4 experts
    for file in source.glob("*.safetensors"):
        file.write_bytes(b"garbage")  # any weight read would fail differently
    with pytest.raises(ShardabilityError, match="4 experts cannot be split evenly over ep=3"):
        reshard.convert(source, tmp_path / "art", tp=3, ep=3, progress=False)
    with pytest.raises(ShardabilityError, match="ep must equal tp"):
        reshard.convert(source, tmp_path / "art", tp=2, ep=4, progress=False)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize(("kind", "tp"), [("llama_gqa8", 4), ("family_qwen3_moe", 2)])
def test_views_reads_and_thread_counts_give_the_same_bytes(tmp_path, monkeypatch, threads, kind, tp):
    """Source bytes lent as views of the mapped checkpoint and rowwise columns scattered by preadv, or everything
    read into the writer's buffer and gathered in Python (a source that lends no span), by one writer thread or
    several: the same rank files (the MoE kind adds strided [gate; up] ranges and fused experts)."""
    import reshard.write.engine
    import reshard.write.os_calls
    import reshard.write.rank_files
    import reshard.write.reader

    source = make_checkpoint(kind, tmp_path / "src")
    reference = tmp_path / "ref"
    reshard.convert(source, reference, tp=tp, progress=False)
    monkeypatch.setattr(reshard.write.reader.ChunkReader, "span", lambda self, *args: None)
    monkeypatch.setattr(reshard.write.rank_files, "default_threads", lambda ranks: threads)
    reshard.convert(source, tmp_path / "read", tp=tp, progress=False)
    for path in reference.iterdir():
        assert path.read_bytes() == (tmp_path / "read" / path.name).read_bytes(), path.name


def test_memory_stays_bounded_by_the_buffers_not_the_model(tmp_path: Path):
    """A 270 MB checkpoint converted with 4 MiB buffers, then verified, in a fresh process: its peak RSS grows by
    far less than the model (mapped pages are dropped once written or hashed, buffers are fixed)."""
    source = tmp_path / "big"
    source.mkdir()
    config = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 1024,
        "intermediate_size": 4096, "num_hidden_layers": 4, "num_attention_heads": 8, "num_key_value_heads": 8,
        "vocab_size": 32000, "tie_word_embeddings": False,
    }  # fmt: skip
    (source / "config.json").write_text(json.dumps(config))
    shapes = {"model.embed_tokens.weight": (32000, 1024), "lm_head.weight": (32000, 1024), "model.norm.weight": (1024,)}
    for layer in range(4):
        prefix = f"model.layers.{layer}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"{prefix}self_attn.{name}.weight"] = (1024, 1024)
        shapes[f"{prefix}mlp.gate_proj.weight"] = shapes[f"{prefix}mlp.up_proj.weight"] = (4096, 1024)
        shapes[f"{prefix}mlp.down_proj.weight"] = (1024, 4096)
        shapes[f"{prefix}input_layernorm.weight"] = shapes[f"{prefix}post_attention_layernorm.weight"] = (1024,)
    header, offset = {}, 0
    for name, shape in sorted(shapes.items()):
        nbytes = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header).encode()
    with open(source / "model.safetensors", "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little") + encoded)
        block = bytes(i % 64 for i in range(256)) * 4096  # 1 MiB of finite bf16 values (no NaN)
        for _ in range(offset // len(block)):
            handle.write(block)
        handle.write(block[: offset % len(block)])
    assert offset > 250e6
    # VmHWM, not ru_maxrss: the latter also counts the image of the parent this process was forked from (pytest)
    script = (
        "import re, sys, reshard, reshard.write.rank_files\n"
        "def peak(): return int(re.search(r'VmHWM:\\s+(\\d+) kB', open('/proc/self/status').read())[1]) * 1024\n"
        "reshard.write.rank_files.DEFAULT_BUFFER_BYTES = 4 << 20\n"
        "before = peak()\n"
        "reshard.convert(sys.argv[1], sys.argv[2], tp=2, progress=False)\n"
        "from reshard.commands.verify import verify_artifact\n"
        "assert verify_artifact(sys.argv[2]) == []\n"
        "print(before, peak())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(source), str(tmp_path / "art")], capture_output=True, text=True, check=True
    )
    before, peak = (int(field) for field in result.stdout.split())
    assert peak - before < 100e6, f"peak RSS grew by {(peak - before) / 1e6:.0f} MB for a {offset / 1e6:.0f} MB model"
    assert reassemble(tmp_path / "art")["lm_head.weight"].shape == (32000, 1024)


def test_a_source_cut_short_under_the_writer_is_named(tmp_path: Path):
    """Reads that come back short (a file truncated after its header was checked) name the file and tensor."""
    from reshard.write.reader import OpenFiles, Span

    path = tmp_path / "cut.safetensors"
    path.write_bytes(b"x" * 100)
    files = OpenFiles()
    try:
        span = Span(files, path, "model.norm.weight", 40, 100)
        with pytest.raises(FileFormatError, match=r"cut\.safetensors: tensor 'model\.norm\.weight' is cut short"):
            span.scatter([(0, [memoryview(bytearray(100))], 100)])
        with pytest.raises(FileFormatError, match=r"tensor 'model\.norm\.weight' is cut short"), span.mapped():
            pass
    finally:
        files.close()


@pytest.mark.parametrize("durable", [True, False])
def test_rank_files_are_fsynced_unless_no_fsync(checkpoints, tmp_path, monkeypatch, durable):
    """Durable by default: every rank file is fsynced before the manifest is written; --no-fsync leaves them in the
    page cache (the manifest and the folder are still made durable) and writes the same bytes."""
    synced: list[str] = []
    original = os.fsync

    def recording(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        original(fd)

    monkeypatch.setattr(os, "fsync", recording)
    out = tmp_path / "art"
    args = ["--tp", "2", str(checkpoints["llama"]), "-o", str(out), "-q", *([] if durable else ["--no-fsync"])]
    result = CliRunner().invoke(cli, args)  # in this process, so that the recording fsync sees every call
    assert result.exit_code == 0, result.output
    rank_files_synced = {Path(path).name for path in synced if path.endswith(".safetensors.tmp")}
    assert rank_files_synced == (
        {"rank-00000-of-00002.safetensors.tmp", "rank-00001-of-00002.safetensors.tmp"} if durable else set()
    )
    reference = tmp_path / "ref"
    reshard.convert(checkpoints["llama"], reference, tp=2, progress=False)
    for path in reference.iterdir():
        assert path.read_bytes() == (out / path.name).read_bytes(), path.name


@pytest.mark.parametrize("where", ["preallocate", "write"])
def test_a_full_disk_is_one_line_naming_the_rank_file(checkpoints, tmp_path, monkeypatch, capsys, where):
    """No space for a rank file: reported before any byte where the file system preallocates, else at the failing
    write; either way one line naming the file, exit code 11, and no artifact."""
    import ctypes
    import errno

    import reshard.write.engine
    import reshard.write.os_calls
    import reshard.write.rank_files
    from reshard.cli import main

    if where == "preallocate":

        def no_space(fd: int, mode: int, offset: int, length: int) -> int:
            ctypes.set_errno(errno.ENOSPC)
            return -1

        monkeypatch.setattr(reshard.write.os_calls, "_fallocate", no_space)
    else:
        monkeypatch.setattr(reshard.write.os_calls, "_fallocate", None)  # a file system that cannot preallocate
        real_write = os.write

        def failing(fd: int, data: bytes) -> int:
            if os.readlink(f"/proc/self/fd/{fd}").endswith("rank-00001-of-00002.safetensors.tmp"):
                raise OSError(errno.ENOSPC, "No space left on device")
            return real_write(fd, data)

        monkeypatch.setattr(os, "write", failing)
    with pytest.raises(SystemExit) as exit_info:
        main(["--tp", "2", str(checkpoints["llama"]), "-o", str(tmp_path / "art"), "-q"])
    assert exit_info.value.code == 11
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1, error
    assert ("rank-00000" if where == "preallocate" else "rank-00001-of-00002.safetensors") in error, error
    assert ("not enough disk space" if where == "preallocate" else "No space left on device") in error, error
    assert not (tmp_path / "art").exists()


def test_progress_bar_counts_bytes_and_quiet_silences_it(checkpoints: dict[str, Path], tmp_path: Path):
    """Long work shows a tqdm bar in bytes on stderr; -q shows none."""
    shown = run_cli("--tp", "2", str(checkpoints["llama"]), "-o", str(tmp_path / "shown"))
    assert shown.returncode == 0, shown.stderr
    assert "write 2 of 2 rank files" in shown.stderr and "B/s" in shown.stderr, shown.stderr
    quiet = run_cli("--tp", "2", str(checkpoints["llama"]), "-o", str(tmp_path / "quiet"), "-q")
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr


def test_tokenizer_and_config_files_are_copied_and_hashed(tmp_path: Path):
    """Every non-weight file of the source (config, generation config, tokenizer) is in the artifact, byte for
    byte, and in the manifest with its size and xxh3-128."""
    source = make_checkpoint("llama", tmp_path / "src", tokenizer=True)
    manifest = reshard.convert(source, tmp_path / "art", tp=2, progress=False)
    extras = {p.name for p in source.iterdir() if p.is_file() and not p.name.startswith("model")}
    assert any(name.startswith("tokenizer") for name in extras), extras
    recorded = {f.path: (f.size, f.xxh3) for f in manifest.files if f.rank is None}
    assert recorded == {name: reference_hash(source / name) for name in extras}
    for name in extras:
        assert (tmp_path / "art" / name).read_bytes() == (source / name).read_bytes(), name


def test_a_converter_reshard_cannot_replay_is_one_line(tmp_path: Path):
    """A converter reshard does not replay (here an ``Interleave`` inverse in a custom plan's place) is refused with
    the converter named; inkling2_text whose ranks would hold an odd number of interleaved gate/up rows (37 at tp 2:
    transformers' own load fails, gate and up would mix) is refused naming the tensor, exit 5, before anything is
    written."""
    pytest.importorskip("transformers")
    from reshard.manifests.chunks import StoredTensor, contiguous
    from reshard.manifests.errors import PlanError
    from reshard.manifests.plans import ConverterRecord
    from reshard.transforms import experts
    from tests.helpers.tester_configs import make_tiny_checkpoint

    inverse = ConverterRecord("WeightConverter", ("w13",), ("gate_up",), (("Interleave", {"dim": 1, "inverse": True}),))
    table = {"l.w13": StoredTensor("l.w13", "F32", (2, 4), contiguous("f", 0, 32))}
    with pytest.raises(PlanError, match=r"cannot replay transformers' converter .*Interleave"):
        experts.forward(table, (inverse,))
    make_tiny_checkpoint("inkling2_text", tmp_path / "src", moe_intermediate_size=37)
    result = run_cli("--tp", "2", str(tmp_path / "src"), "-o", str(tmp_path / "art"), "-q")
    assert result.returncode == 5, result.stderr
    assert "gate_up_proj" in result.stderr and "[37, 37] rows of dim 1" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "art").exists() and not (tmp_path / ".art.partial").exists()


def test_check_judges_a_custom_plan_merged_as_convert_applies_it(tmp_path: Path):
    """A rule on up_proj alone keeps the model's k_proj rule (merged, as transformers does): tp 4 splits the 2 KV
    heads, so `check` says NO, exactly as the conversion would refuse."""
    source = make_checkpoint("llama", tmp_path / "src")  # 4 heads, 2 KV heads
    plan = '{"model.layers.*.mlp.up_proj": "colwise"}'
    result = run_cli("check", "--tp", "4", "--plan", plan, str(source))
    assert result.returncode == 5 and "num_key_value_heads=2 is not divisible by tp=4" in result.stdout
    assert run_cli("check", "--tp", "2", "--plan", plan, str(source)).returncode == 0
