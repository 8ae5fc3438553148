"""Issue 12 item 3: loading in another dtype casts as ``from_pretrained`` does, and ``reshard --dtype`` stores the
artifact in the dtype the runtime will use, so that the zero-copy load stays the default.

Offline: every tensor of a ``--dtype`` conversion is the plain conversion's, cast by torch (round to nearest even),
whatever path the engine takes (views, ``preadv`` scatter, fused experts, re-sharding); modules transformers keeps
in float32 stay float32. At runtime (torchrun, 2 ranks; this file is also the worker): a float32 artifact loaded
with ``dtype=torch.bfloat16``, and a ``--dtype bfloat16`` artifact loaded as stored, both equal
``from_pretrained(source, dtype=torch.bfloat16, distributed_config=DistributedConfig(tp_size=2))`` exactly; the
second one's tensors are views of the mapped rank file.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("transformers")

QWEN = {"num_attention_heads": 8, "num_key_value_heads": 4}  # float32, biases, shardable at tp 2 and 4
PROMPT = [[1, 5, 77, 900, 1000, 3, 42, 500, 250]]


def convert(source: Path, out: Path, tp: int, **options: Any) -> Any:
    from reshard.commands.convert import run
    from reshard.request import ConversionRequest
    from reshard.workers import solo

    return run(ConversionRequest(str(source), out, tp, progress=False, **options), solo())


def rank_tensors(artifact: Path) -> list[dict[str, torch.Tensor]]:
    from reshard.manifests import read_manifest

    manifest = read_manifest(artifact)
    return [load_file(artifact / manifest.rank_file(rank).path) for rank in range(manifest.tp)]


def assert_cast_of(cast_artifact: Path, plain_artifact: Path, dtype: torch.dtype, kept: tuple[str, ...] = ()) -> None:
    """Every slice of ``cast_artifact`` is ``plain_artifact``'s cast to ``dtype`` (``kept`` names: float32)."""
    for cast_rank, plain_rank in zip(rank_tensors(cast_artifact), rank_tensors(plain_artifact), strict=True):
        assert cast_rank.keys() == plain_rank.keys()
        for name, plain in plain_rank.items():
            wanted = torch.float32 if any(k in name for k in kept) else dtype
            assert cast_rank[name].dtype == wanted, name
            assert torch.equal(cast_rank[name], plain.to(wanted)), name


@pytest.mark.parametrize(
    ("kind", "overrides", "tp", "options"),
    [
        ("qwen2", QWEN, 2, {}),  # views and rowwise columns scattered by preadv
        ("llama_h24", {"dtype": "float32"}, 3, {}),  # uneven rows
        ("family_qwen3_moe", {}, 2, {}),  # per-expert tensors fused, packed rowwise
        ("family_qwen3_moe", {}, 2, {"ep": 2}),  # whole experts per rank
    ],
)
def test_dtype_stores_the_plain_conversion_cast_by_torch(tiny, tmp_path: Path, kind, overrides, tp, options) -> None:
    from reshard.manifests import read_manifest

    source = tiny.checkpoint(kind, **overrides)
    plain = convert(source, tmp_path / "plain", tp, **options)
    manifest = convert(source, tmp_path / "bf16", tp, dtype="bfloat16", **options)
    assert_cast_of(tmp_path / "bf16", tmp_path / "plain", torch.bfloat16)
    assert {t.dtype for t in plain.tensors} == {"F32"}
    assert {t.dtype for t in manifest.tensors} == {"BF16"}  # the manifest records what is stored
    assert manifest.artifact != plain.artifact  # another job: a run of one never resumes the other
    assert read_manifest(tmp_path / "bf16").tensors == manifest.tensors
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["dtype"] == "bfloat16" and "torch_dtype" not in config
    source_config = json.loads((source / "config.json").read_text())
    assert {k: v for k, v in config.items() if k != "dtype"} == {k: v for k, v in source_config.items() if k != "dtype"}


def test_rounding_is_torchs(tmp_path: Path) -> None:
    """Ties round to even, NaN and infinities survive, float16 overflows to inf: the bits ``.to`` gives."""
    from safetensors.torch import save_file

    from tests.helpers.checkpoints import make_checkpoint

    source = make_checkpoint("qwen2", tmp_path / "src", **QWEN)
    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.o_proj.weight"  # rowwise: scattered by preadv when not cast
    file = source / index[name]
    tensors = load_file(file)
    special = torch.tensor(
        [1.0 + 2**-8, 1.0 + 3 * 2**-8, float("nan"), float("inf"), -float("inf"), 1e6, 70000.0, -0.0, 2**-140],
        dtype=torch.float32,
    )
    weight = tensors[name].flatten().clone()
    weight[: len(special)] = special
    tensors[name] = weight.view(tensors[name].shape)
    save_file(tensors, file, metadata={"format": "pt"})
    for dtype, torch_dtype in (("bfloat16", torch.bfloat16), ("float16", torch.float16)):
        convert(source, tmp_path / dtype, 2, dtype=dtype)
        stored = torch.cat([rank[name] for rank in rank_tensors(tmp_path / dtype)], dim=1)
        expected = tensors[name].to(torch_dtype)
        assert torch.equal(stored.view(torch.int16), expected.view(torch.int16)), dtype  # bits, NaN included


def test_resharding_with_dtype_casts_the_artifact(tiny, tmp_path: Path) -> None:
    """Re-sharding reads only the old rank files; --dtype casts them (a bfloat16 artifact back to float32 is exact)."""
    old = tiny.artifact("qwen2", tp=2, **QWEN)
    convert(old, tmp_path / "tp4-bf16", 4, dtype="bfloat16")
    convert(tiny.checkpoint("qwen2", **QWEN), tmp_path / "tp4", 4)
    assert_cast_of(tmp_path / "tp4-bf16", tmp_path / "tp4", torch.bfloat16)
    convert(tmp_path / "tp4-bf16", tmp_path / "tp2-f32", 2, dtype="float32")
    convert(tmp_path / "tp4-bf16", tmp_path / "tp2-bf16", 2)  # auto: as stored
    assert_cast_of(tmp_path / "tp2-f32", tmp_path / "tp2-bf16", torch.float32)
    assert json.loads((tmp_path / "tp2-f32" / "config.json").read_text())["dtype"] == "float32"


def test_modules_transformers_keeps_in_float32_stay_float32(tiny, tmp_path: Path) -> None:
    """deepseek_v3's ``_keep_in_fp32_modules_strict``: from_pretrained(dtype=bfloat16) keeps them float32, so do we."""
    source = tiny.checkpoint("family_deepseek_v3")
    convert(source, tmp_path / "plain", 2)
    manifest = convert(source, tmp_path / "bf16", 2, dtype="bfloat16")
    kept = ("e_score_correction_bias",)
    assert_cast_of(tmp_path / "bf16", tmp_path / "plain", torch.bfloat16, kept)
    assert {t.dtype for t in manifest.tensors if "e_score_correction_bias" in t.name} == {"F32"}


def test_auto_and_a_dtype_already_stored_change_nothing(tiny, tmp_path: Path) -> None:
    source = tiny.checkpoint("qwen2", **QWEN)
    plain = convert(source, tmp_path / "plain", 2)
    same = convert(source, tmp_path / "same", 2, dtype="float32")
    assert same.artifact == plain.artifact and same.tensors == plain.tensors
    assert (tmp_path / "same" / "config.json").read_bytes() == (source / "config.json").read_bytes()


def test_worker_processes_carry_the_dtype(tiny, tmp_path: Path) -> None:
    from reshard.request import STORED_DTYPES, ConversionRequest

    request = ConversionRequest("m", tmp_path, 2, dtype="float16")
    argv = request.worker_argv(0, 2)
    assert argv[argv.index("--dtype") + 1] == "float16"
    assert "--dtype" not in ConversionRequest("m", tmp_path, 2).worker_argv(0, 2)
    source = tiny.checkpoint("qwen2", **QWEN)
    convert(source, tmp_path / "plain", 2)
    convert(source, tmp_path / "workers", 2, dtype="float16", workers=2)
    assert_cast_of(tmp_path / "workers", tmp_path / "plain", torch.float16)
    from reshard.cli import convert as command

    choices = next(p for p in command.params if p.name == "dtype").type.choices  # type: ignore[attr-defined]
    assert list(choices) == list(STORED_DTYPES)


def test_unknown_dtype_is_one_click_line(tiny, tmp_path: Path) -> None:
    from reshard.manifests.errors import ReshardError
    from reshard.request import ConversionRequest

    source = tiny.checkpoint("qwen2", **QWEN)
    result = subprocess.run(
        [sys.executable, "-m", "reshard", "--tp", "2", str(source), "-o", str(tmp_path / "a"), "--dtype", "float33"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error")]
    assert result.returncode == 2 and len(errors) == 1 and "Invalid value for '--dtype'" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "a").exists()
    with pytest.raises(ReshardError, match="dtype must be one of auto, float32, bfloat16, float16"):
        ConversionRequest(str(source), tmp_path / "a", 2, dtype="float33")


def test_state_dict_casts_floating_tensors_and_says_so_once(tiny, caplog) -> None:
    from reshard.loaders import load_state_dict
    from reshard.manifests.errors import ReshardError

    artifact = tiny.artifact("qwen2", tp=1, **QWEN)  # float32
    stored = load_state_dict(artifact)
    with caplog.at_level("WARNING", logger="reshard.loaders.state_dict"):
        cast = load_state_dict(artifact, dtype=torch.bfloat16)
    assert [r.message for r in caplog.records if "reshard --dtype bfloat16" in r.message and "copies" in r.message]
    assert len(caplog.records) == 1
    assert all(
        cast[n].dtype == torch.bfloat16 and torch.equal(cast[n], t.to(torch.bfloat16)) for n, t in stored.items()
    )
    caplog.clear()
    with caplog.at_level("WARNING", logger="reshard.loaders.state_dict"):
        assert load_state_dict(artifact, dtype="float32")
    assert not caplog.records  # as stored: nothing to say
    with pytest.raises(ReshardError, match="dtype must be"):
        load_state_dict(artifact, dtype=torch.int8)


def test_parity_with_from_pretrained_under_torchrun(tiny, tmp_path: Path) -> None:
    from tests.helpers.distributed import run_torchrun

    source = tiny.checkpoint("qwen2", **QWEN)
    float32 = tiny.artifact("qwen2", tp=2, **QWEN)
    bfloat16 = tmp_path / "bf16"
    convert(source, bfloat16, 2, dtype="bfloat16")
    cases = [
        {"name": "cast at load", "source": str(source), "artifact": str(float32), "dtype": "bfloat16"},
        {"name": "stored bf16", "source": str(source), "artifact": str(bfloat16), "dtype": "auto"},
    ]
    (tmp_path / "spec.json").write_text(json.dumps(cases))
    run_torchrun(__file__, str(tmp_path / "spec.json"), str(tmp_path), nproc=2, timeout=300)
    for rank in range(2):
        results = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for case in cases:
            seen = results[case["name"]]
            assert seen["names"], case
            assert seen["unequal"] == [], case["name"]
            assert seen["dtypes"] == ["torch.bfloat16"], case["name"]
            assert seen["logits_equal"], case["name"]
            assert seen["state_unequal"] == [], case["name"]
        cast, stored = results["cast at load"], results["stored bf16"]
        assert set(cast["files"]) == {None}  # copies, said once in the log
        assert cast["warnings"] == 1 and stored["warnings"] == 0
        rank_file = str((bfloat16 / f"rank-{rank:05d}-of-00002.safetensors").resolve())
        assert set(stored["files"]) == {rank_file}  # every parameter a view of the mapped rank file


def _worker() -> None:
    """Under torchrun: each case of SPEC, ``load_model`` against ``from_pretrained`` in bfloat16 at tp 2."""
    import logging
    import warnings

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    from reshard.loaders import load_model, load_state_dict
    from tests.helpers.memory import mapped_file

    warnings.simplefilter("ignore")
    spec, out, rank = json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]), int(os.environ["RANK"])
    results = {}

    class Count(logging.Handler):
        count = 0

        def emit(self, record: logging.LogRecord) -> None:
            Count.count += "reshard --dtype" in record.getMessage()

    logging.getLogger("reshard.loaders").addHandler(Count())
    for case in spec:
        theirs = AutoModelForCausalLM.from_pretrained(
            case["source"], dtype=torch.bfloat16, distributed_config=DistributedConfig(tp_size=2)
        )
        Count.count = 0
        ours = load_model(case["artifact"], dtype=case["dtype"])
        warned = Count.count
        their_params = dict(theirs.named_parameters(remove_duplicate=False))
        our_params = dict(ours.named_parameters(remove_duplicate=False))

        def local(t: torch.Tensor) -> torch.Tensor:
            return t.to_local() if isinstance(t, DTensor) else t

        def same(a: torch.Tensor, b: torch.Tensor) -> bool:
            kinds = isinstance(a, DTensor) == isinstance(b, DTensor)
            if kinds and isinstance(a, DTensor) and isinstance(b, DTensor):
                kinds = a.placements == b.placements and a.shape == b.shape
            return kinds and a.dtype == b.dtype and torch.equal(local(a), local(b))

        state = load_state_dict(case["artifact"], dtype=case["dtype"])
        with torch.no_grad():
            logits_equal = torch.equal(theirs(torch.tensor(PROMPT)).logits, ours(torch.tensor(PROMPT)).logits)
        results[case["name"]] = {
            "names": sorted(their_params) == sorted(our_params),
            "unequal": sorted(
                n for n in their_params if n not in our_params or not same(their_params[n], our_params[n])
            ),
            "dtypes": sorted({str(p.dtype) for p in our_params.values()}),
            "logits_equal": bool(logits_equal),
            "state_unequal": sorted(n for n, t in state.items() if n in our_params and not same(our_params[n], t)),
            "files": sorted({str(f) if (f := mapped_file(p)) else None for p in our_params.values()}, key=str),
            "warnings": warned,
        }
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # skip interpreter finalization (gloo + CPython abort, see tests/helpers/runtime_worker.py)


if __name__ == "__main__":
    _worker()


def test_python_api_takes_the_dtype(tiny, tmp_path: Path) -> None:
    import reshard

    manifest = reshard.convert(tiny.checkpoint("qwen2"), tmp_path / "art", tp=2, dtype="bfloat16", progress=False)
    assert {t.dtype for t in manifest.tensors} == {"BF16"}
    assert json.loads((tmp_path / "art" / "config.json").read_text())["dtype"] == "bfloat16"
