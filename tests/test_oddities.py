"""Checkpoints as the Hub really has them, odd corners included, against transformers' own loader.

- Odd tensors (GPT-NeoX's 0-dim ``attention.masked_bias`` and bool ``attention.bias``, int64 and bool scalars,
  empty tensors, 1-element tensors) convert, verify, re-shard, consolidate bit for bit, inspect and load.
- ``dtype="auto"`` builds the model in config.json's dtype (``torch_dtype`` too), as ``from_pretrained`` does;
  where config.json names none, in the index's ``metadata.dtype``, else the first floating tensor of the first file.
- The weights transformers reads: ``model.safetensors`` beside an index, every tensor of every file (one stored
  twice with the same bytes is fine, with other bytes refused naming both files); ``.bin``-only refused with the
  command that writes safetensors.

Runtime cases run under torchrun, 2 ranks (this file is also the worker): ``load_model`` against
``from_pretrained(source, tp_plan="auto")`` on the same folder: parameter values, placements, model dtype, logits
``torch.equal``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")

PROMPT = [[1, 5, 77, 90, 98, 3, 42, 50, 25]]  # inside every vocabulary here (qwen3_5 tester: 99)
ODD = {  # beside GPT-NeoX's own old buffers: every kind of tensor with no ordinary shape
    "odd.int64_scalar": torch.tensor(7, dtype=torch.int64),
    "odd.bool_scalar": torch.tensor(True),
    "odd.bf16_scalar": torch.tensor(1.5, dtype=torch.bfloat16),
    "odd.empty_rows": torch.zeros(0, 8),
    "odd.empty_columns": torch.zeros(8, 0),
    "odd.empty_i64": torch.zeros(0, dtype=torch.int64),
    "odd.one": torch.tensor([3.5]),
    "odd.bool_vector": torch.tensor([True, False, True]),
}


def raw(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's bytes (0-dim, bool and empty tensors included), for bit-for-bit comparison."""
    return tensor.reshape(-1).view(torch.uint8)


def same_bytes(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> list[str]:
    """Names whose dtype, shape or bytes differ, or that only one side has."""
    return sorted(
        name
        for name in a.keys() | b.keys()
        if name not in a
        or name not in b
        or (a[name].dtype, a[name].shape) != (b[name].dtype, b[name].shape)
        or not torch.equal(raw(a[name]), raw(b[name]))
    )


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def odd_neox(path: Path) -> Path:
    """A tiny GPT-NeoX checkpoint in one file with the buffers old Pythia checkpoints store, and ``ODD``."""
    from tests.helpers.checkpoints import make_checkpoint

    make_checkpoint("family_gpt_neox", path, max_shard_size="10MB")
    tensors = load_file(path / "model.safetensors")
    for layer in range(2):
        tensors[f"gpt_neox.layers.{layer}.attention.masked_bias"] = torch.tensor(-1e9)
        tensors[f"gpt_neox.layers.{layer}.attention.bias"] = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None]
    save_file({**tensors, **ODD}, path / "model.safetensors", metadata={"format": "pt"})
    return path


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reshard", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def one_error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The refusal: exit ``code``, exactly one line on stderr, no traceback."""
    lines = [line for line in result.stderr.splitlines() if line.strip() and "%|" not in line]
    assert result.returncode == code, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def test_odd_tensors_through_every_command(tmp_path: Path) -> None:
    source = odd_neox(tmp_path / "src")
    original = load_file(source / "model.safetensors")
    artifacts = {"tp2": tmp_path / "tp2"}
    assert run_cli("--tp", "2", str(source), "-o", str(artifacts["tp2"])).returncode == 0
    for tp in (4, 1):  # re-sharded from the artifact alone
        artifacts[f"tp{tp}"] = tmp_path / f"tp{tp}"
        assert run_cli("--tp", str(tp), str(artifacts["tp2"]), "-o", str(artifacts[f"tp{tp}"])).returncode == 0
    for name, artifact in artifacts.items():
        assert run_cli("verify", str(artifact)).returncode == 0, name
        shown = run_cli("inspect", str(artifact))
        assert shown.returncode == 0 and all(odd in shown.stdout for odd in ODD), name
        back = tmp_path / f"back-{name}"
        assert run_cli("consolidate", str(artifact), "-o", str(back)).returncode == 0, name
        renamed = {n.replace("lm_head.", "embed_out."): t for n, t in folder_tensors(back).items()}
        assert same_bytes(renamed, original) == [], name
    cast = tmp_path / "bf16"  # every floating scalar cast too, the rest unchanged
    assert run_cli("--tp", "2", str(source), "-o", str(cast), "--dtype", "bfloat16").returncode == 0
    assert run_cli("consolidate", str(cast), "-o", str(tmp_path / "back-bf16")).returncode == 0
    back = {n.replace("lm_head.", "embed_out."): t for n, t in folder_tensors(tmp_path / "back-bf16").items()}
    expected = {n: t.to(torch.bfloat16) if t.is_floating_point() else t for n, t in original.items()}
    assert same_bytes(back, expected) == []


def test_a_rerun_after_a_crash_at_write_completes(tmp_path: Path) -> None:
    """The folder a crashed run left (hidden, no manifest) is not an artifact, and the next run finishes it."""
    source = odd_neox(tmp_path / "src")
    out = tmp_path / "out"
    staging = tmp_path / ".out.partial"
    staging.mkdir()
    (staging / "rank-00000-of-00002.safetensors").write_bytes(b"\0" * 100)  # a short rank file
    assert run_cli("verify", str(staging)).returncode != 0
    assert run_cli("--tp", "2", str(source), "-o", str(out)).returncode == 0
    assert run_cli("verify", str(out)).returncode == 0 and not staging.exists()


def test_a_tensor_stored_twice_with_other_bytes_is_refused_naming_both_files(tiny, tmp_path: Path) -> None:
    source = Path(shutil.copytree(tiny.checkpoint("llama"), tmp_path / "src"))
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    name, first = sorted(index.items())[0]
    other = next(f for f in sorted(set(index.values())) if f != first)
    stale = load_file(source / other)
    stale[name] = load_file(source / first)[name] + 1
    save_file(stale, source / other, metadata={"format": "pt"})
    line = one_error_line(run_cli("--tp", "2", str(source), "-o", str(tmp_path / "a")), 3)
    assert name in line and first in line and other in line and "other bytes" in line
    assert not (tmp_path / "a").exists()


def test_an_index_naming_a_tensor_no_read_file_holds_is_refused(tiny, tmp_path: Path) -> None:
    """transformers reads only the files the index names: a tensor alone in a file the index no longer names would
    be initialised at random there; here it is refused."""
    source = Path(shutil.copytree(tiny.checkpoint("llama"), tmp_path / "src"))
    index_path = source / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(index["weight_map"].values())
    name, alone = next((n, f) for n, f in sorted(index["weight_map"].items()) if files.count(f) == 1)
    index["weight_map"][name] = next(f for f in files if f != alone)
    index_path.write_text(json.dumps(index))
    line = one_error_line(run_cli("--tp", "2", str(source), "-o", str(tmp_path / "a")), 3)
    assert name in line and "no weights file holds it" in line


def test_pickle_only_checkpoint_names_a_command_that_works(tmp_path: Path) -> None:
    """The command in the refusal, run as printed, writes a checkpoint that converts to transformers' model."""
    from transformers import AutoModelForCausalLM

    from tests.helpers.checkpoints import make_checkpoint

    source = make_checkpoint("qwen2", tmp_path / "made")
    model = AutoModelForCausalLM.from_pretrained(source)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    shutil.copy(source / "config.json", pickled / "config.json")
    line = one_error_line(run_cli("--tp", "2", str(pickled), "-o", str(tmp_path / "a")), 3)
    assert "pytorch_model.bin" in line and "save_pretrained" in line and "safetensors/convert" in line
    command = line[line.index("python -c ") : line.index(" (then copy")]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"]
    subprocess.run([sys.executable, "-c", argv[2]], cwd=tmp_path, check=True, capture_output=True, timeout=300)
    written = tmp_path / "pickled-safetensors"
    assert same_bytes(folder_tensors(written), folder_tensors(source)) == []
    assert run_cli("--tp", "2", str(written), "-o", str(tmp_path / "a")).returncode == 0


def test_hub_repo_without_safetensors_names_the_command_for_the_repo(tiny, tmp_path: Path) -> None:
    """A Hub download fetches no pickles: a repo with none of its weights in safetensors gets the same command."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--pickled"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    shutil.copy(tiny.checkpoint("qwen2") / "config.json", snapshot / "config.json")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "reshard", "--tp", "2", "acme/pickled", "-o", str(tmp_path / "a")],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    line = one_error_line(result, 3)
    command = shlex.split(line[line.index("python -c ") : line.index(" (then copy")])
    assert command[2] == (
        'import transformers; transformers.Qwen2ForCausalLM.from_pretrained("acme/pickled")'
        '.save_pretrained("pickled-safetensors")'
    )


@pytest.mark.parametrize(
    ("where", "value", "fragment"),
    [
        ("config", {"dtype": "float8_e4m3fn"}, 'dtype is "float8_e4m3fn"'),
        ("config", {"torch_dtype": "int8"}, 'torch_dtype is "int8"'),
        ("config", {"dtype": 16}, "dtype is 16"),
        ("config", {"transformers_weights": "../elsewhere.safetensors"}, "leads outside"),
        ("config", {"transformers_weights": "weights.pt"}, "transformers_weights must name"),
        ("config", {"torch_dtype": "auto"}, 'torch_dtype is "auto"'),
        ("config", {"dtype": {"": "bfloat16"}}, "dtype is {"),
        ("config", {"text_config": {"model_type": "llama", "dtype": "uint8"}}, 'text_config.dtype is "uint8"'),
        ("config", {"transformers_weights": 5}, "transformers_weights must name"),
        ("config", {"transformers_weights": "missing.safetensors"}, "missing, but config.json"),
        ("index", {"dtype": "float8_e5m2"}, "metadata.dtype"),
        ("index", {"dtype": ["bfloat16"]}, "metadata.dtype"),
    ],
)
def test_fields_transformers_cannot_load_are_refused_in_one_line(tiny, tmp_path: Path, where, value, fragment):
    source = Path(shutil.copytree(tiny.checkpoint("llama"), tmp_path / "src"))
    config = json.loads((source / "config.json").read_text())
    if where == "index":  # read only when config.json names no dtype
        config.pop("dtype", None)
        index_path = source / "model.safetensors.index.json"
        index = json.loads(index_path.read_text())
        index["metadata"].update(value)
        index_path.write_text(json.dumps(index))
    else:
        config.update(value)
    (source / "config.json").write_text(json.dumps(config))
    line = one_error_line(run_cli("--tp", "2", str(source), "-o", str(tmp_path / "a")), 3)
    assert fragment in line, line


def runtime_sources(tiny, root: Path) -> dict[str, Path]:
    """Each runtime case's source folder, as the Hub could ship it."""
    from tests.helpers.checkpoints import make_checkpoint
    from tests.helpers.tester_configs import make_tiny_checkpoint

    def config_edit(folder: Path, **fields: Any) -> None:
        config = json.loads((folder / "config.json").read_text())
        config.pop("dtype", None)
        config.update({k: v for k, v in fields.items() if v is not None})
        (folder / "config.json").write_text(json.dumps(config))

    sources = {"odd_neox": odd_neox(root / "odd_neox")}
    # float32 weights under a config saying bfloat16 (the older torch_dtype key): a bfloat16 model
    sources["config_dtype"] = Path(shutil.copytree(tiny.checkpoint("qwen2"), root / "config_dtype"))
    config_edit(sources["config_dtype"], torch_dtype="bfloat16")
    # no dtype in config.json: the first floating tensor by name of the first file (an unused float32 scalar)
    # decides, though nearly every byte is bfloat16
    single = make_checkpoint("llama", root / "weights_dtype", max_shard_size="10MB")
    config_edit(single)
    tensors = load_file(single / "model.safetensors")
    save_file({**tensors, "a.unused": torch.tensor(0.5)}, single / "model.safetensors", metadata={"format": "pt"})
    sources["weights_dtype"] = single
    # no dtype in config.json, float32 in the index's metadata, bfloat16 weights
    sources["index_dtype"] = Path(shutil.copytree(tiny.checkpoint("llama"), root / "index_dtype"))
    config_edit(sources["index_dtype"])
    index_path = sources["index_dtype"] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["metadata"]["dtype"] = "float32"
    index_path.write_text(json.dumps(index))
    # a multimodal checkpoint's text model is built from its text config: that level's dtype counts
    composite = make_tiny_checkpoint("qwen3_5", root / "text_config_dtype")
    config = json.loads((composite / "config.json").read_text())
    config["dtype"], config["text_config"]["dtype"] = "float16", "bfloat16"
    (composite / "config.json").write_text(json.dumps(config))
    sources["text_config_dtype"] = composite
    # a model with a persistent 1-element buffer of its own (each decoder layer's layer_scalar)
    sources["gemma4_text"] = make_tiny_checkpoint("gemma4_text", root / "gemma4_text")
    for file in sources["gemma4_text"].glob("*.safetensors"):  # values its initialisation (ones) cannot give
        tensors = load_file(file)
        scalars = {n: torch.full_like(t, 0.5 + int(n.split(".")[2])) for n, t in tensors.items() if "layer_scalar" in n}
        if scalars:
            save_file({**tensors, **scalars}, file, metadata={"format": "pt"})
    # model.safetensors (seed 1) beside an index and shards (seed 0): transformers reads model.safetensors
    both = make_checkpoint("llama", root / "single_and_index", seed=1, max_shard_size="10MB")
    for file in tiny.checkpoint("llama").glob("model-*"):
        shutil.copy(file, both / file.name)
    shutil.copy(tiny.checkpoint("llama") / "model.safetensors.index.json", both)
    sources["single_and_index"] = both
    # one tensor in two shards with the same bytes
    twice = Path(shutil.copytree(tiny.checkpoint("llama"), root / "stored_twice"))
    index = json.loads((twice / "model.safetensors.index.json").read_text())["weight_map"]
    name, first = sorted(index.items())[0]
    other = next(f for f in sorted(set(index.values())) if f != first)
    tensors = load_file(twice / other)
    save_file({**tensors, name: load_file(twice / first)[name]}, twice / other, metadata={"format": "pt"})
    sources["stored_twice"] = twice
    # the index says another file than the one holding a tensor: transformers reads every tensor of every file
    misplaced = Path(shutil.copytree(tiny.checkpoint("llama"), root / "index_misplaced"))
    index_path = misplaced / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    files = sorted(index["weight_map"].values())
    name, first = next((n, f) for n, f in sorted(index["weight_map"].items()) if files.count(f) > 1)  # file stays read
    index["weight_map"][name] = next(f for f in sorted(set(files)) if f != first)
    index_path.write_text(json.dumps(index))
    sources["index_misplaced"] = misplaced
    return sources


def test_parity_with_from_pretrained_under_torchrun(tiny, tmp_path: Path) -> None:
    from reshard.commands.convert import run
    from reshard.request import ConversionRequest
    from reshard.workers import solo
    from tests.helpers.distributed import run_torchrun

    cases = []
    for name, source in runtime_sources(tiny, tmp_path).items():
        artifact = tmp_path / f"{name}-tp2"
        run(ConversionRequest(str(source), artifact, 2, progress=False), solo())
        cases.append({"name": name, "source": str(source), "artifact": str(artifact)})
    regrid = tmp_path / "odd_neox-tp4"  # loaded at 2 ranks: slices cut from the tp 4 files
    run(ConversionRequest(cases[0]["artifact"], regrid, 4, progress=False), solo())
    cases.append({"name": "odd_neox_from_tp4", "source": cases[0]["source"], "artifact": str(regrid)})
    (tmp_path / "spec.json").write_text(json.dumps(cases))
    run_torchrun(__file__, str(tmp_path / "spec.json"), str(tmp_path), nproc=2, timeout=600)
    wanted = {
        "config_dtype": "torch.bfloat16",
        "text_config_dtype": "torch.bfloat16",
        "gemma4_text": "torch.float32",
        "weights_dtype": "torch.float32",
        "index_dtype": "torch.float32",
        "single_and_index": "torch.bfloat16",
        "stored_twice": "torch.bfloat16",
        "index_misplaced": "torch.bfloat16",
        "odd_neox": "torch.float32",
        "odd_neox_from_tp4": "torch.float32",
    }
    failed = {}
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case in cases:
            seen = results[case["name"]]
            ok = seen["names"] and seen["unequal"] == [] and seen["logits_equal"] and seen["odd_unequal"] == []
            ok = ok and seen["buffers_unequal"] == [] and seen["buffers"] > 0
            if not ok or seen["dtypes"] != [wanted[case["name"]]] * 2:
                failed[f"{case['name']} rank {rank}"] = seen
    assert failed == {}


def _worker() -> None:
    """Under torchrun: each case of SPEC, ``load_model`` against ``from_pretrained(source, tp_plan="auto")``."""
    import warnings

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM

    from reshard.loaders import load_model, load_state_dict

    warnings.simplefilter("ignore")
    spec, out, rank = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), int(os.environ["RANK"])
    results = {}
    for case in spec:
        theirs = AutoModelForCausalLM.from_pretrained(case["source"], tp_plan="auto")
        ours = load_model(case["artifact"])
        their_params = dict(theirs.named_parameters(remove_duplicate=False))
        our_params = dict(ours.named_parameters(remove_duplicate=False))

        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if isinstance(t, DTensor) else t

        def same(a: torch.Tensor, b: torch.Tensor) -> bool:
            kinds = isinstance(a, DTensor) == isinstance(b, DTensor)
            if kinds and isinstance(a, DTensor) and isinstance(b, DTensor):
                kinds = a.placements == b.placements and a.shape == b.shape
            return kinds and a.dtype == b.dtype and torch.equal(local(a), local(b))

        with torch.no_grad():
            logits_equal = torch.equal(theirs(torch.tensor(PROMPT)).logits, ours(torch.tensor(PROMPT)).logits)
        state = load_state_dict(case["artifact"])  # as stored: the odd tensors whole on every rank
        full = {n: t.full_tensor() if isinstance(t, DTensor) else t for n, t in state.items() if n.startswith("odd.")}
        their_buffers, our_buffers = dict(theirs.named_buffers()), dict(ours.named_buffers())
        results[case["name"]] = {
            "buffers": len(their_buffers),
            "buffers_unequal": sorted(
                n for n, t in their_buffers.items() if n not in our_buffers or not same(t, our_buffers[n])
            ),
            "names": sorted(their_params) == sorted(our_params),
            "unequal": sorted(
                n for n in their_params if n not in our_params or not same(their_params[n], our_params[n])
            ),
            "dtypes": [str(theirs.dtype), str(ours.dtype)],
            "logits_equal": bool(logits_equal),
            "odd_unequal": same_bytes(full, ODD) if "odd_neox" in case["name"] else [],
        }
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter finalization (gloo + CPython abort, see tests/helpers/runtime_worker.py)


if __name__ == "__main__":
    _worker()
