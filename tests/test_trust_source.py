"""Issue 10, "trust nothing unchecked": a hostile or damaged source folder ends in one line, never a traceback or a
hang, and only allowlisted files reach the artifact (no pickles, no symlinks leading out)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from reshard.manifests.errors import FileFormatError
from reshard.manifests.safetensors import encode_header, read_header
from reshard.source.checkpoint import extra_files
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint("llama", tmp_path_factory.mktemp("trust") / "llama", tokenizer=True)


@pytest.fixture
def source(base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "src"))


def run_cli(*args: str, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    """``python -m reshard ARGS``; a timeout fails the test instead of hanging it (a FIFO read blocks forever)."""
    return subprocess.run(
        [sys.executable, "-m", "reshard", *args],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,
    )


def assert_one_line(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr


def first_shard(folder: Path) -> Path:
    """The shard holding the most tensors (an overlap needs two), first by name among equals."""
    files = list(json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"].values())
    return folder / min(set(files), key=lambda name: (-files.count(name), name))


def rewrite_header(path: Path, change: Any) -> None:
    """Apply ``change`` to the parsed header of ``path`` and write it back in the same number of bytes."""
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    change(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    assert len(raw) <= length
    path.write_bytes(data[:8] + raw + b" " * (length - len(raw)) + data[8 + length :])


def convert(source: Path, out: Path, umask: int | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli("--tp", "2", str(source), "-o", str(out), "-q", umask=umask)


# --- source extras by allowlist -------------------------------------------------------------------------------


def hostile_extras(source: Path, outside: Path) -> None:
    """A secret linked in from outside, a pickle, a private README and an inside symlink (allowed)."""
    secret = outside / "secret.txt"
    secret.write_text("root:$6$hash\n")
    secret.chmod(0o600)
    (source / "notes.txt").symlink_to(secret)
    (source / "training_args.bin").write_bytes(b"\x80\x04K\x01.")
    (source / "README.md").write_text("# tiny\n")
    (source / "README.md").chmod(0o600)
    (source / "templates").mkdir()
    (source / "templates" / "chat.jinja").write_text("{{ messages }}")
    (source / "chat_template.jinja").symlink_to(source / "templates" / "chat.jinja")


def test_only_allowlisted_extras_are_copied_and_the_rest_is_listed(source: Path, tmp_path: Path) -> None:
    hostile_extras(source, tmp_path)
    result = convert(source, tmp_path / "art")
    assert result.returncode == 0, result.stderr
    art = tmp_path / "art"
    copied = {p.name for p in art.iterdir() if not p.name.startswith("rank-") and p.name != "manifest.json"}
    assert {"config.json", "tokenizer.json", "README.md", "chat_template.jinja"} <= copied, copied
    assert not {"notes.txt", "training_args.bin", "templates"} & copied, copied
    assert (art / "chat_template.jinja").read_text() == "{{ messages }}"
    for name in copied:
        assert stat.S_IMODE((art / name).stat().st_mode) == 0o644, name

    text = run_cli("inspect", str(art))
    assert text.returncode == 0, text.stderr
    assert "skipped    notes.txt: symlink leading outside the source folder" in text.stdout
    assert "skipped    training_args.bin: pickle" in text.stdout
    summary = json.loads(run_cli("inspect", "--json", str(art)).stdout)
    skipped = dict(entry.split(": ", 1) for entry in summary["source"]["skipped"])
    assert set(skipped) == {"notes.txt", "training_args.bin", "templates"}, skipped
    assert "outside" in skipped["notes.txt"] and "pickle" in skipped["training_args.bin"]
    manifest = json.loads((art / "manifest.json").read_text())
    assert manifest["source"]["skipped"] == summary["source"]["skipped"]


def test_copies_are_0644_whatever_the_umask(source: Path, tmp_path: Path) -> None:
    result = convert(source, tmp_path / "art", umask=0o077)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE((tmp_path / "art" / "config.json").stat().st_mode) == 0o644


def test_hub_snapshot_symlinks_into_blobs_are_followed(tmp_path: Path) -> None:
    """A Hub cache snapshot's files link to ../../blobs: followed; a link anywhere else is not."""
    repo = tmp_path / "hub" / "models--acme--tiny"
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (repo / "blobs" / f"blob-{name}").write_text("{}")
        (snapshot / name).symlink_to(Path("../../blobs") / f"blob-{name}")
    (tmp_path / "elsewhere.json").write_text("{}")
    (snapshot / "vocab.json").symlink_to(tmp_path / "elsewhere.json")
    extra, skipped = extra_files(snapshot, {snapshot / "model.safetensors"})
    assert [p.name for p in extra] == ["config.json", "tokenizer.json"]
    assert skipped == ["vocab.json: symlink leading outside the source folder"]


# --- regular files only ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["shard", "index", "config"])
def test_a_fifo_in_place_of_a_source_file_fails_at_once(source: Path, tmp_path: Path, which: str) -> None:
    path = {
        "shard": first_shard(source),
        "index": source / "model.safetensors.index.json",
        "config": source / "config.json",
    }[which]
    path.unlink()
    os.mkfifo(path)
    assert_one_line(convert(source, tmp_path / "art"), 3, path.name, "regular file")
    assert not (tmp_path / "art").exists()


def test_read_header_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "pipe.safetensors")
    with pytest.raises(FileFormatError, match="not a regular file"):
        read_header(tmp_path / "pipe.safetensors")


# --- config types and values ----------------------------------------------------------------------------------


def edit_config(source: Path, change: Any) -> None:
    path = source / "config.json"
    path.write_text(json.dumps(change(json.loads(path.read_text()))))


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda c: {**c, "num_attention_heads": "4"}, 'num_attention_heads must be an integer, got "4" (a string)'),
        (lambda c: {**c, "hidden_size": None}, "hidden_size must be an integer, got null"),
        (lambda c: {**c, "num_key_value_heads": 2.0}, "num_key_value_heads must be an integer"),
        (lambda c: {**c, "intermediate_size": [96, "96"]}, 'intermediate_size must be an integer, got [96, "96"]'),
        (lambda c: {**c, "num_experts": [4, 4]}, "num_experts must be an integer, got [4, 4]"),  # per layer: no
        (lambda c: {**c, "tie_word_embeddings": "false"}, "tie_word_embeddings must be true or false"),
        (lambda c: {**c, "text_config": [1]}, "text_config must be an object"),
        (lambda c: {**c, "model_type": ["llama"]}, "model_type must be a string"),
        (lambda c: [c], "not a JSON object (a list)"),
    ],
)
@pytest.mark.parametrize("command", ["check", "convert"])
def test_wrong_config_types_give_one_line(source: Path, tmp_path: Path, change: Any, fragment: str, command: str):
    edit_config(source, change)
    args = ("check", "--tp", "2", str(source)) if command == "check" else ("--tp", "2", str(source), "-o", "x")
    assert_one_line(run_cli(*args), 3, "config.json", fragment)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("num_attention_heads", 0),
        ("num_hidden_layers", 0),
        ("num_key_value_heads", -2),
        ("hidden_size", 0),
        ("vocab_size", -1),
        ("intermediate_size", -1),
    ],
)
def test_configs_that_cannot_make_a_model_are_refused(source: Path, tmp_path: Path, field: str, value: int) -> None:
    edit_config(source, lambda c: {**c, field: value})
    assert_one_line(run_cli("check", "--tp", "2", str(source)), 5, "config.json", f"{field}={value}")
    assert_one_line(convert(source, tmp_path / "art"), 5, f"{field}={value}")
    assert not (tmp_path / "art").exists()


# --- safetensors headers --------------------------------------------------------------------------------------


def overlap(header: dict[str, Any]) -> None:
    """Move the second tensor in data order one byte back, into the first."""
    second = sorted((v["data_offsets"], k) for k, v in header.items() if k != "__metadata__")[1][1]
    header[second]["data_offsets"] = [o - 1 for o in header[second]["data_offsets"]]


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (overlap, "(it overlaps"),
        (lambda h: h.update(__metadata__="pt"), "__metadata__ must be an object of strings"),
        (lambda h: h.update(__metadata__={"format": 1}), "__metadata__ 'format' must be a string"),
    ],
)
def test_bad_source_headers_exit_12(source: Path, tmp_path: Path, change: Any, fragment: str) -> None:
    shard = first_shard(source)
    rewrite_header(shard, change)
    assert_one_line(convert(source, tmp_path / "art"), 12, shard.name, fragment)


def write_raw(path: Path, header: dict[str, Any], data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def test_read_header_mirrors_safetensors_coverage_rules(tmp_path: Path) -> None:
    """Accepted: what safetensors writes (zero-size tensors too) and reshard's own padded headers. Refused, as
    safetensors refuses them: a gap, bytes after the last tensor, a first tensor not at 0."""
    save_file(
        {"a": np.zeros(3, np.float32), "e": np.zeros(0, np.int8), "b": np.ones((2, 2), np.int64)},
        str(tmp_path / "lib.safetensors"),
        metadata={"format": "np"},
    )
    written = read_header(tmp_path / "lib.safetensors")
    assert set(written.tensors) == {"a", "b", "e"} and written.metadata == {"format": "np"}
    own = encode_header([("x", "F32", (3,)), ("y", "U8", (5,))], {"rank": "0"}, align=64)
    (tmp_path / "own.safetensors").write_bytes(own + bytes(17))
    assert read_header(tmp_path / "own.safetensors").data_start % 64 == 0

    def entry(begin: int, end: int) -> dict[str, Any]:
        return {"dtype": "U8", "shape": [end - begin], "data_offsets": [begin, end]}

    cases = {
        "gap": ({"a": entry(0, 4), "b": entry(6, 10)}, 10, "gap of 2 bytes"),
        "trailing": ({"a": entry(0, 4)}, 8, "4 bytes after the last tensor"),
        "leading": ({"a": entry(2, 6)}, 6, "gap of 2 bytes"),
    }
    for name, (header, size, fragment) in cases.items():
        path = write_raw(tmp_path / f"{name}.safetensors", header, bytes(size))
        with pytest.raises(FileFormatError, match=fragment):
            read_header(path)


def test_a_per_layer_intermediate_size_is_read(source: Path) -> None:
    """gemma3n gives one intermediate size per layer: each is checked, the list is no error."""
    edit_config(source, lambda c: {**c, "intermediate_size": [96, 97]})
    result = run_cli("check", "--tp", "2", str(source))
    assert result.returncode == 0, result.stderr
    assert "intermediate_size=97 is uneven" in result.stdout
    edit_config(source, lambda c: {**c, "intermediate_size": [96, -1]})
    assert_one_line(run_cli("check", "--tp", "2", str(source)), 5, "config.json", "intermediate_size=-1")
