"""Every transformers release in the declared range: its own built-in plans, recorded, and checked at load.

A conversion follows the installed release's plans and conversions (``--transformers`` picks another) and records
it; ``load_model`` refuses, on every rank with one line, an artifact whose placements or conversions the installed
release would not give, and loads one whose plan the two releases share exactly as the installed transformers'
``from_pretrained`` does. The torchrun cases run under whichever release is installed against "the other" release
of the range, so that running this file under 5.23 and under 5.24 (``make compat``) covers both directions.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

import reshard
from reshard.cli import main
from reshard.manifests import read_manifest
from reshard.manifests.errors import ManifestError, PlanError
from reshard.manifests.manifest import DIGEST_FIELD, manifest_digest
from reshard.manifests.plans import (
    CHANGES_NAME,
    PlanSets,
    builtin_plan,
    builtin_plan_names,
    installed_transformers,
    minor_version,
    plan_sets,
    plans_version,
)
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.tester_configs import make_tiny_checkpoint
from tests.test_runtime_tp import check_identical_to_transformers, run, strip_to_rank

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
INSTALLED = str(installed_transformers())
OTHER = next(v for v in reversed(plan_sets().versions) if v != minor_version(plans_version()))  # another release


def test_a_release_resolves_through_the_older_folders() -> None:
    """5.24 shards lfm2's embeddings (5.23 does not); llama is 5.23's record under both; gptj starts in 5.24."""
    assert "model.embed_tokens" not in builtin_plan("lfm2", "5.23.0").tp_plan
    assert builtin_plan("lfm2", "5.24.1").tp_plan["model.embed_tokens"] == "embedding_rowwise"
    assert builtin_plan("llama", "5.24").transformers_version == "5.23.0"
    assert builtin_plan("llama", "5.24") == builtin_plan("llama", "5.23")
    assert "gptj" in builtin_plan_names("5.24") and "gptj" not in builtin_plan_names("5.23")
    with pytest.raises(PlanError, match=r"gptj has a tensor-parallel plan from transformers 5\.24; .* 5\.23\.0"):
        builtin_plan("gptj", "5.23.0")
    with pytest.raises(PlanError, match=r"no built-in tensor-parallel plan for model_type 'bert'"):
        builtin_plan("bert", "5.24")


def test_each_newer_folder_holds_exactly_what_changed() -> None:
    """A newer release's folder holds the records that differ from the release below it, and says which."""
    root = ROOT / "manifests" / "plans"
    sets = PlanSets(root)
    for older, newer in zip(sets.versions, sets.versions[1:], strict=False):
        changes = json.loads((root / newer / CHANGES_NAME).read_text())
        files = {p.name[:-5] for p in (root / newer).glob("*.json") if p.name != CHANGES_NAME}
        assert changes["base"] == older and files == set(changes["changed"]) | set(changes["new"])
        for model_type in changes["changed"]:
            assert sets.plan(model_type, older) != sets.plan(model_type, newer), model_type
        assert not set(changes["new"]) & set(sets.names(older))


def test_the_generator_writes_only_differences(tmp_path: Path) -> None:
    """generate_plans.differences over a fake base: a changed, a new and a removed type, an unchanged one left out."""
    from generate_plans import differences, dumps

    def record(model_type: str, rule: str, version: str) -> dict[str, Any]:
        plan = {
            "model_type": model_type,
            "architecture": "X",
            "transformers_version": version,
            "tp_plan": {rule: "colwise"},
        }
        return {
            **plan,
            "ep_plan": {},
            "styles": ["colwise"],
            "renamings": [],
            "key_converters": [],
            "parameters": [],
            "base_model_prefix": "",
        }

    (tmp_path / "5.23").mkdir()
    for model_type in ("same", "changed", "gone"):
        (tmp_path / "5.23" / f"{model_type}.json").write_text(dumps(record(model_type, "a", "5.23.0")))
    generated = {
        f"{t}.json": dumps(record(t, "b" if t != "same" else "a", "5.24.0")) for t in ("same", "changed", "new")
    }
    files = differences({**generated, "INDEX.json": "{}"}, "5.24.0", PlanSets(tmp_path))
    assert sorted(files) == [CHANGES_NAME, "changed.json", "new.json"]
    changes = json.loads(files[CHANGES_NAME])
    assert (changes["changed"], changes["new"], changes["removed"]) == (["changed"], ["new"], ["gone"])
    (tmp_path / "5.24").mkdir()
    for name, text in files.items():
        (tmp_path / "5.24" / name).write_text(text)
    sets = PlanSets(tmp_path)
    assert sets.names("5.24.3") == ("changed", "new", "same") and sets.plan("gone", "5.24") is None
    assert sets.plan("same", "5.24") == sets.plan("same", "5.23")
    assert differences(generated, "5.23.0", PlanSets(tmp_path / "5.23")) == generated  # no older folder: all


def test_the_installed_release_is_chosen_and_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = make_tiny_checkpoint("lfm2", tmp_path / "lfm2", tie_word_embeddings=True)
    made = reshard.convert(source, tmp_path / "installed", tp=2, progress=False)
    assert made.transformers_version == INSTALLED == read_manifest(tmp_path / "installed").transformers_version
    assert made.plan == builtin_plan("lfm2", INSTALLED).tp_plan
    chosen = reshard.convert(source, tmp_path / "chosen", tp=2, progress=False, transformers="5.24")
    assert chosen.transformers_version == "5.24" and chosen.plan["model.embed_tokens"] == "embedding_rowwise"
    resharded = reshard.convert(tmp_path / "chosen", tmp_path / "resharded", tp=1, progress=False)
    assert resharded.transformers_version == "5.24" and resharded.plan == chosen.plan  # re-sharding keeps both
    with pytest.raises(PlanError, match=r"transformers 5\.25\.0 was asked for .* 5\.23, 5\.24 only"):
        reshard.convert(source, tmp_path / "newer", tp=2, progress=False, transformers="5.25.0")
    with pytest.raises(PlanError, match=r"transformers version 'abc' was asked for .*: not a release number"):
        reshard.convert(source, tmp_path / "garbage", tp=2, progress=False, transformers="abc")
    monkeypatch.setattr("reshard.manifests.plans.installed_transformers", lambda: None)
    assert plans_version() == plan_sets().versions[-1]  # without transformers: the newest release reshard knows
    monkeypatch.setattr("reshard.manifests.plans.installed_transformers", lambda: "5.22.2")
    with pytest.raises(PlanError, match=r"transformers 5\.22\.2 is installed, but .* --transformers VERSION"):
        plans_version()


def test_a_type_new_in_a_later_release_is_refused_with_one_true_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_tiny_checkpoint("gptj", tmp_path / "gptj")
    args = ["--tp", "2", str(source), "-o", str(tmp_path / "out"), "-q", "--transformers", "5.23.0"]
    capsys.readouterr()  # save_pretrained's progress bar
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    err = capsys.readouterr().err
    assert exit_info.value.code == PlanError.exit_code and len(err.strip().splitlines()) == 1, err
    assert "gptj has a tensor-parallel plan from transformers 5.24" in err and "5.23.0" in err
    assert reshard.convert(source, tmp_path / "ok", tp=2, progress=False, transformers="5.24").plan


@pytest.fixture(scope="module")
def llama_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("versions")
    return reshard.convert(make_checkpoint("llama", root / "src"), root / "art", tp=2, progress=False) and root / "art"


def resealed(artifact: Path, target: Path, value: Any) -> Path:
    """A copy whose manifest's ``transformers_version`` is ``value`` (absent for ``...``), digest recomputed."""
    copy = Path(shutil.copytree(artifact, target))
    data = json.loads((copy / "manifest.json").read_text())
    data.pop("transformers_version")
    if value is not ...:
        data["transformers_version"] = value
    data[DIGEST_FIELD] = manifest_digest(data)
    (copy / "manifest.json").write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (524, r"transformers_version: expected a string, got 524"),
        ("banana", r"transformers_version: \"banana\" does not match"),
        ("5.99.0", r"transformers_version: transformers 5\.99\.0: this reshard has the built-in plans of"),
        ("4.57.1", r"transformers 4\.57\.1: this reshard has the built-in plans of transformers 5\.23, 5\.24 only"),
    ],
)
def test_the_recorded_version_is_validated(
    llama_artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], value: Any, message: str
) -> None:
    copy = resealed(llama_artifact, tmp_path / "art", value)
    capsys.readouterr()
    with pytest.raises(ManifestError, match=message):
        read_manifest(copy)
    with pytest.raises(SystemExit) as exit_info:
        main(["inspect", str(copy)])
    err = capsys.readouterr().err
    assert exit_info.value.code == ManifestError.exit_code and len(err.strip().splitlines()) == 1, err


def test_a_manifest_without_the_field_still_reads(llama_artifact: Path, tmp_path: Path) -> None:
    """Manifests written before the field followed 5.23's plans; they read as such and re-serialize unchanged."""
    copy = resealed(llama_artifact, tmp_path / "art", ...)
    manifest = read_manifest(copy)
    assert manifest.transformers_version is None
    assert json.loads(manifest.to_json()) == json.loads((copy / "manifest.json").read_text())


@pytest.fixture(scope="module")
def across_releases(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], dict[str, Path]]:
    """Under torchrun (2 ranks): artifacts made for the other release of the range, and for the installed one,
    loaded under the installed transformers."""
    root = tmp_path_factory.mktemp("across")
    lfm2 = make_tiny_checkpoint("lfm2", root / "lfm2", vocab_size=1001, tie_word_embeddings=True)
    llama = make_checkpoint("llama", root / "llama")
    made = {
        "lfm2_other": reshard.convert(lfm2, root / "lfm2-other", tp=2, progress=False, transformers=OTHER),
        "lfm2_installed": reshard.convert(lfm2, root / "lfm2-installed", tp=2, progress=False),
        "llama_other": reshard.convert(llama, root / "llama-other", tp=2, progress=False, transformers=OTHER),
    }
    assert made["lfm2_other"].plan != made["lfm2_installed"].plan  # 5.24 shards embed_tokens, 5.23 does not
    artifacts = {name: root / name.replace("_", "-") for name in made}
    sources = {"lfm2_installed": lfm2, "llama_other": llama}
    spec: list[dict[str, Any]] = [
        {"name": "lfm2_other", "kind": "model_error", "artifact": str(artifacts["lfm2_other"])}
    ]
    for name, source in sources.items():
        stripped = [str(strip_to_rank(artifacts[name], r, root / f"{name}-rank{r}")) for r in range(2)]
        spec.append({"name": name, "kind": "compare", "source": str(source), "stripped": stripped})
    return run(spec, 2, root / "out"), artifacts


def test_other_plan_is_refused_on_every_rank_with_one_line(across_releases) -> None:
    """tied lfm2 made for the other release (embed_tokens sharded by 5.24 only): the same one-line PlanError on both
    ranks, naming the parameter, both releases and the command that converts again; never a model."""
    results, _ = across_releases
    errors = [r["lfm2_other"] for r in results]
    assert errors[0] == errors[1] and errors[0]["type"] == "PlanError", errors
    message = errors[0]["message"]
    assert len(message.splitlines()) == 1 and message.startswith("all 2 ranks: "), message
    assert "model.embed_tokens" in message and OTHER in message and INSTALLED in message, message
    assert "convert again under the installed release: reshard --tp 2 CHECKPOINT" in message, message


@pytest.mark.parametrize("name", ["lfm2_installed", "llama_other"])
def test_same_plan_loads_as_the_installed_transformers(across_releases, name: str) -> None:
    """The installed release's own artifact (tied lfm2, whose logits differed from from_pretrained's under 5.24 when
    reshard kept 5.23's plan) and a llama made for the other release (the same plan and conversions in both) load as
    from_pretrained(tp_plan="auto") under the installed transformers: parameters, logits equal, greedy generate."""
    results, _ = across_releases
    for result in (r[name] for r in results):
        check_identical_to_transformers(result)


def test_a_converter_reshard_does_not_replay_is_refused() -> None:
    """5.24's sarvam_moe splits a fused query_key_value at load: converting it unconverted would leave q/k/v_proj to
    be initialised at random by transformers, so the conversion is refused (the 5.24 records, as data)."""
    from reshard.planning.job import refuse_unreplayed

    converters = builtin_plan("sarvam_moe", "5.24").key_converters
    fused = {"model.layers.0.self_attn.query_key_value.weight": None, "model.norm.weight": None}
    with pytest.raises(PlanError, match=r"'model\.layers\.0\.self_attn\.query_key_value\.weight': .* \(Split\)"):
        refuse_unreplayed(fused, converters, "ckpt", "5.24.0")  # type: ignore[arg-type]
    refuse_unreplayed({"model.layers.0.self_attn.q_proj.weight": None}, converters, "ckpt", "5.24.0")  # type: ignore[arg-type]
    replayed = builtin_plan("qwen3_moe", "5.23").key_converters  # per-expert fusing: replayed, never refused
    refuse_unreplayed({"model.layers.0.mlp.experts.0.gate_proj.weight": None}, replayed, "ckpt", "5.23.0")  # type: ignore[arg-type]
