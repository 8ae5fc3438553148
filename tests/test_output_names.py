"""The default artifact folder names everything that makes two conversions of one model differ."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from reshard.commands.convert import default_output
from reshard.manifests import read_manifest


def test_default_output_names_each_option():
    assert default_output("org/Model", 4) == Path("Model-tp4")
    assert default_output("./ckpt/", 4, pp=2) == Path("ckpt-tp4-pp2")
    assert default_output("ckpt", 4, ep=4) == Path("ckpt-tp4-ep4")
    assert default_output("ckpt", 2, dtype="bfloat16") == Path("ckpt-tp2-bfloat16")
    assert default_output("ckpt", 2, pp=1, ep=1, dtype="auto") == Path("ckpt-tp2")


def test_plain_ep_and_dtype_conversions_do_not_collide(tiny, tmp_path: Path):
    """Three conversions of one MoE checkpoint with default names: three folders, each what its name says."""
    source = tiny.checkpoint("family_qwen3_moe")
    for options in ([], ["--ep", "2"], ["--dtype", "bfloat16"]):
        command = [sys.executable, "-m", "reshard", "--tp", "2", *options, str(source), "-q", "--no-fsync"]
        result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    name = source.name
    assert not read_manifest(tmp_path / f"{name}-tp2").ep_plan
    assert read_manifest(tmp_path / f"{name}-tp2-ep2").ep_plan
    stored = {t.dtype for t in read_manifest(tmp_path / f"{name}-tp2-bfloat16").tensors}
    assert "BF16" in stored, stored  # the float32 source, cast
    # Re-sharding an expert-parallel artifact keeps expert parallelism, and its default name says so.
    command = [sys.executable, "-m", "reshard", "--tp", "2", str(tmp_path / f"{name}-tp2-ep2"), "-q"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_manifest(tmp_path / f"{name}-tp2-ep2-tp2-ep2").ep_plan


def test_mistyped_folder_says_both_and_suggests(tmp_path: Path):
    """A mistyped folder is also a valid repo id: the error says neither exists, and names the folder meant."""
    (tmp_path / "SmolLM2-135M").mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    for command in (["--tp", "2", "smoll"], ["check", "--tp", "2", "smoll"]):
        result = subprocess.run(
            [sys.executable, "-m", "reshard", *command],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
        )
        assert result.returncode == 3, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line, line
        assert f"no folder '{tmp_path / 'smoll'}'" in line and "did you mean ./SmolLM2-135M?" in line, line
        assert "not in the local cache and downloads are off (HF_HUB_OFFLINE)" in line, line


def test_online_message_suggests_offline_mode(tmp_path: Path, monkeypatch):
    from reshard.source.checkpoint import not_found_anywhere

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    assert "the Hub is unreachable (HF_HUB_OFFLINE=1 fails fast)" in not_found_anywhere("org/name")
