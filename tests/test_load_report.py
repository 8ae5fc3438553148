"""The load report: a checkpoint compared with the model transformers builds, at conversion and by ``reshard check``.

Refusals (exit 3, one line) where transformers would load random weights or a wrong shape; tensors the model does
not use kept once in ``unused.safetensors`` (in no rank file), given back bit for bit by ``consolidate``; and, under
torchrun, such artifacts (tp, and pp with DeepSeek-V3's MTP layer) loading to transformers' own model.
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
from safetensors import safe_open

import reshard
from reshard.commands.consolidate import consolidate
from reshard.commands.verify import verify_artifact
from reshard.manifests import MANIFEST_NAME, read_manifest
from reshard.manifests.errors import ManifestError
from reshard.manifests.load_report import UNUSED_FILE
from reshard.manifests.manifest import manifest_digest
from tests.helpers.load_cases import make_case, tensors_of

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def cases(tiny, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("load")
    return lambda kind: make_case(kind, tiny, root)


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reshard", *args], capture_output=True, text=True, timeout=300, cwd=cwd
    )


def rank_file_names(artifact: Path) -> set[str]:
    names: set[str] = set()
    for entry in read_manifest(artifact).files:
        if entry.rank is not None:
            with safe_open(artifact / entry.path, "pt") as f:
                names |= set(f.keys())
    return names


REFUSED = {
    # transformers adds the base model's prefix (so does reshard) and loads lm_head at random
    "base": ["not in the checkpoint (initialised at random): lm_head.weight", "saved from the base model (AutoModel)"],
    "half_q": ["model.layers.1.self_attn.q_proj.weight: the checkpoint has shape [32, 64]", "[64, 64]"],
    "deeper": ["model.layers.2.", "layer 2, but config.json has num_hidden_layers=2 and declares 0 more"],
}


@pytest.mark.parametrize("kind", sorted(REFUSED))
def test_refused_in_one_line_with_exit_3_by_convert_and_check(cases, tmp_path: Path, kind: str):
    source = cases(kind)
    result = cli("--tp", "2", str(source), "-o", str(tmp_path / "out"), "-q")
    assert result.returncode == 3, result.stderr
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in line and str(source) in line, line
    assert all(part in line for part in REFUSED[kind]), line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    checked = cli("check", "--tp", "2", str(source))
    assert checked.returncode == 3 and "load   NO" in checked.stdout
    assert all(part in checked.stdout for part in REFUSED[kind]), checked.stdout


def test_allow_missing_converts_and_records_what_loads_at_random(cases, tmp_path: Path):
    manifest = reshard.convert(cases("base"), tmp_path / "art", tp=2, progress=False, allow_missing=True)
    report = manifest.load_report
    # the base model's keys get its prefix, as transformers' loader adds it; only the head loads at random
    assert report is not None and report.missing == ("lm_head.weight",) and not report.unused
    assert "model.norm.weight" in {t.name for t in manifest.tensors} and report.unused_file is None
    shown = cli("inspect", str(tmp_path / "art")).stdout
    assert "MISSING (initialised at random): 1" in shown


@pytest.mark.parametrize(
    ("kind", "reasons"),
    [
        ("old_rotary", {"ignored"}),
        ("tied_copy", {"ignored", "tied_copy"}),
        ("mtp", {"extra_layer"}),
    ],
)
def test_unused_tensors_are_stored_once_and_consolidate_back(cases, tmp_path: Path, kind: str, reasons: set[str]):
    source = cases(kind)
    art = tmp_path / "art"
    manifest = reshard.convert(source, art, tp=2, progress=False)
    report = manifest.load_report
    assert report is not None and not report.missing and {u.reason for u in report.unused} == reasons
    unused = {u.name for u in report.unused}
    assert unused and not unused & rank_file_names(art)  # in no rank file
    with safe_open(art / UNUSED_FILE, "pt") as f:
        assert set(f.keys()) == unused  # but once, whole, in the unused file
    if kind == "mtp":  # the MTP layer's experts fused as the model's would be, and stored so
        assert "model.layers.2.mlp.experts.gate_up_proj" in unused
    if kind == "tied_copy":
        assert report.tied == ("lm_head.weight",)
    assert verify_artifact(art, lambda n: None) == []
    original = tensors_of(source)
    for folder in (consolidate(art, tmp_path / "back", progress=False), _resharded_and_back(art, tmp_path)):
        back = tensors_of(Path(folder))
        assert back.keys() == original.keys() and not (Path(folder) / UNUSED_FILE).exists()
        assert all(torch.equal(back[k].view(torch.uint8), v.view(torch.uint8)) for k, v in original.items())


def _resharded_and_back(art: Path, tmp_path: Path) -> Path:
    """Re-shard to tp 1 (the unused file travels as it is), then consolidate that."""
    again = reshard.convert(art, tmp_path / "tp1", tp=1, progress=False)
    assert again.load_report == read_manifest(art).load_report
    return consolidate(tmp_path / "tp1", tmp_path / "back-tp1", progress=False)


def test_a_tied_lm_head_that_differs_is_kept_as_transformers_keeps_it(cases, tmp_path: Path):
    manifest = reshard.convert(cases("tied_differs"), tmp_path / "art", tp=2, progress=False)
    assert manifest.load_report is not None and manifest.load_report.unused == ()
    assert "lm_head.weight" in {t.name for t in manifest.tensors}


def test_a_clean_checkpoint_records_an_empty_report_and_keeps_its_bytes(tiny):
    art = tiny.artifact("llama", tp=2)
    report = read_manifest(art).load_report
    assert report is not None and report.checked_against.startswith("LlamaForCausalLM (transformers ")
    assert (report.missing, report.unused, report.unused_file) == ((), (), None)
    assert not (art / UNUSED_FILE).exists()


def _edited(art: Path, target: Path, change) -> Path:
    target.mkdir()
    data = json.loads((art / MANIFEST_NAME).read_text())
    change(data)
    data[next(iter(data))] = manifest_digest(data)  # the digest is the first field
    (target / MANIFEST_NAME).write_text(json.dumps(data))
    for entry in read_manifest(art).files:
        os.link(art / entry.path, target / entry.path)
    return target


LIES: dict[str, tuple[Any, str]] = {
    "also_a_tensor": (
        lambda d: d["load_report"]["unused"].__setitem__(
            0, {**d["load_report"]["unused"][0], "name": "model.norm.weight"}
        ),
        "load_report.unused[0].name: 'model.norm.weight' is also a tensor of the rank files",
    ),
    "unknown_reason": (
        lambda d: d["load_report"]["unused"][0].__setitem__("reason", "because"),
        "load_report.unused[0].reason: expected unexpected or ignored",
    ),
    "file_renamed": (
        lambda d: d["load_report"].__setitem__("unused_file", "config.json"),  # would stop ranks fetching it
        "load_report.unused_file: 'config.json': the unused tensors' file is 'unused.safetensors'",
    ),
    "file_not_listed": (
        lambda d: d.__setitem__("files", [f for f in d["files"] if f["path"] != "unused.safetensors"]),
        "load_report.unused_file: 'unused.safetensors' is not one of the artifact's other files",
    ),
    "missing_but_present": (
        lambda d: d["load_report"].__setitem__("missing", ["model.norm.weight"]),
        "load_report.missing[0]: 'model.norm.weight' is a tensor of the rank files, not missing",
    ),
    "shape_as_string": (
        lambda d: d["load_report"]["unused"][0].__setitem__("shape", "16"),
        "load_report.unused[0].shape: expected a list",
    ),
    "missing_not_a_list": (
        lambda d: d["load_report"].__setitem__("missing", "model.norm.weight"),
        "load_report.missing: expected a list",
    ),
    "unknown_field": (lambda d: d["load_report"].__setitem__("extra", 1), "load_report.extra: unknown field"),
}


@pytest.mark.parametrize("lie", sorted(LIES))
def test_the_validator_refuses_a_lying_report(cases, tmp_path: Path, lie: str):
    art = tmp_path / "art"
    reshard.convert(cases("old_rotary"), art, tp=2, progress=False)
    change, message = LIES[lie]
    with pytest.raises(ManifestError, match=r"manifest\.json: ") as caught:
        read_manifest(_edited(art, tmp_path / "lie", change))
    assert message in str(caught.value)


def test_a_manifest_written_before_reports_still_loads(tiny, tmp_path: Path):
    old = _edited(tiny.artifact("llama", tp=2), tmp_path / "old", lambda d: d.pop("load_report"))
    assert read_manifest(old).load_report is None
    assert "none (written before reshard checked the load)" in cli("inspect", str(old)).stdout


def _only_what_a_rank_fetches(artifact: Path, rank: int, target: Path) -> Path:
    """The files ``rank`` downloads of a published artifact (``needed_files``): not the unused file."""
    from reshard.loaders.fetch import needed_files

    target.mkdir(parents=True)
    manifest = read_manifest(artifact)
    for entry in needed_files(manifest, rank):
        os.link(artifact / entry.path, target / entry.path)
    os.link(artifact / MANIFEST_NAME, target / MANIFEST_NAME)
    assert not (target / UNUSED_FILE).exists()
    return target


@pytest.fixture(scope="module")
def two_ranks(cases, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Artifacts with unused tensors against transformers under torchrun: tp 2 (``tp_plan="auto"``) and pp 2
    (``DistributedConfig(pp_size=2)``), each rank holding only what it fetches."""
    from tests.test_runtime_tp import run

    root = tmp_path_factory.mktemp("load-runtime")
    spec = []
    for kind, tp, pp in (("tied_copy", 2, None), ("mtp", 2, None), ("mtp", 1, 2), ("old_rotary", 1, 2)):
        name = f"{kind}-tp{tp}-pp{pp}"
        artifact = root / name
        reshard.convert(cases(kind), artifact, tp=tp, pp=pp, progress=False)
        stripped = [str(_only_what_a_rank_fetches(artifact, rank, root / f"{name}-{rank}")) for rank in range(2)]
        case = {"name": name, "kind": "compare", "source": str(cases(kind)), "stripped": stripped}
        case |= {"pp": pp} if pp else {}
        case |= {"experts_implementation": "eager"} if kind == "mtp" else {}
        spec.append(case)
    return run(spec, 2, root / "out", timeout=400)


@pytest.mark.parametrize("case", ["tied_copy-tp2-ppNone", "mtp-tp2-ppNone", "mtp-tp1-pp2", "old_rotary-tp1-pp2"])
def test_artifacts_with_unused_tensors_load_as_transformers(two_ranks, case: str):
    from tests.test_runtime_tp import check_identical_to_transformers

    for result in (r[case] for r in two_ranks):
        check_identical_to_transformers(result)
        assert not any(".layers.2." in name or "inv_freq" in name for name in result["state"])
    if case.startswith("tied_copy"):
        assert all(r[case]["tied"] == [True, True] for r in two_ranks)


def test_check_pp_and_the_conversion_agree_on_the_mtp_layer(cases, tmp_path: Path):
    checked = cli("check", "--pp", "2", str(cases("mtp")))
    assert checked.returncode == 0 and "pp=2   ok" in checked.stdout and "extra_layer" in checked.stdout
    converted = cli("--tp", "1", "--pp", "2", str(cases("mtp")), "-o", str(tmp_path / "art"), "-q")
    assert converted.returncode == 0, converted.stderr
    manifest = read_manifest(tmp_path / "art")
    assert manifest.pipeline is not None and manifest.pipeline.layers == 2
