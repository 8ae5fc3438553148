"""The model-type matrix (issue 12): every model type reshard supports, built tiny the way transformers' testers
build it (``tests/helpers/tester_configs.py``), converted, and loaded through reshard under torchrun, with the checks
transformers' ``TensorParallelTesterMixin`` makes: parameters, forward (sdpa, 2x64), 25-token greedy generate with
per-step scores, backward (loss and every gradient) against transformers' own TP load, and against the unsharded
model; torch.compile forward, static-cache generate, save_pretrained and EP backward for a representative few.

Slow (one torchrun launch per world size over all types): it runs only with ``RESHARD_MATRIX=1`` (``make
test-all``), and writes ``tests/fixtures/matrix_results.json``, from which ``scripts/architectures_table.py`` fills
the "tested" column of docs/architectures.md. ``RESHARD_MATRIX_TYPES=llama,qwen3_moe`` runs a few types only (and
writes no results file, unless ``RESHARD_MATRIX_RECORD=1``: then their entries replace those types' entries in it and
every other entry is kept).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.distributed import free_port
from tests.helpers.tester_configs import (
    KNOWN_FAILURES,
    SKIPPED,
    attention,
    make_tiny_checkpoint,
    supported_types,
)

pytestmark = pytest.mark.skipif(
    os.environ.get("RESHARD_MATRIX") != "1",
    reason="the full model-type matrix runs with RESHARD_MATRIX=1 (make test-all)",
)

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "tests" / "helpers" / "matrix_worker.py"
RESULTS = ROOT / "tests" / "fixtures" / "matrix_results.json"
REPRESENTATIVE = {
    "llama": ["compile", "static", "save"],
    "qwen3_moe": ["compile", "static", "save"],
    **{t: ["save"] for t in ("olmo_hybrid", "kimi_linear", "bailing_hybrid", "hrm_text")},  # converters reversed
}
EP_TYPES = ("qwen3_moe",)
TP4_HEADS = {"num_attention_heads": 4, "num_key_value_heads": 4, "hidden_size": 64}  # 2 heads do not divide by 4
ALL_TYPES = [t for t in supported_types() if t not in SKIPPED]
SELECTED = [t for t in os.environ.get("RESHARD_MATRIX_TYPES", "").split(",") if t] or ALL_TYPES


def launch(cases: list[dict[str, Any]], nproc: int, out: Path) -> None:
    """Run the worker over ``cases``; relaunch after a crash or hang, the case that did not finish marked as such."""
    out.mkdir(parents=True, exist_ok=True)
    remaining = list(cases)
    while remaining:
        (out / "spec.json").write_text(json.dumps(remaining))
        env = {
            **os.environ,
            "OMP_NUM_THREADS": "1",
            "CUDA_VISIBLE_DEVICES": "",
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        }
        command = ["nice", "-n", "10", sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
        command += ["--master-addr=127.0.0.1", f"--master-port={free_port()}", str(WORKER), str(out / "spec.json")]
        command.append(str(out))
        with open(out / "log.txt", "a") as log:
            process = subprocess.Popen(command, env=env, stdout=log, stderr=log, start_new_session=True)
            code = wait_while_progressing(process, out, nproc)
        done = recorded(out, nproc)
        remaining = [case for case in remaining if case["name"] not in done]
        if remaining and code is not None:
            lost = remaining.pop(0)  # the case running when the launch died
            for rank in range(nproc):
                path = out / f"rank{rank}.json"
                results = json.loads(path.read_text()) if path.exists() else {}
                results[lost["name"]] = {"error": f"worker exited {code} (crash or hang) during this case"}
                path.write_text(json.dumps(results, indent=1))


# A case that records nothing for this long hangs (the slowest take about a minute on a quiet machine, several on a
# busy one); its launch is killed and relaunched after it, so a hang costs minutes, not the CI run.
STALL_SECONDS = 600


def wait_while_progressing(process: subprocess.Popen[bytes], out: Path, nproc: int) -> int:
    """The launch's exit code, or -9 after killing it when no rank has recorded a case for ``STALL_SECONDS``."""
    files = [out / f"rank{rank}.json" for rank in range(nproc)]
    last = time.monotonic()
    seen: list[float] = []
    while True:
        try:
            return process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        stamps = [f.stat().st_mtime if f.exists() else 0.0 for f in files]
        if stamps != seen:
            seen, last = stamps, time.monotonic()
        elif time.monotonic() - last > STALL_SECONDS:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return -9


def recorded(out: Path, nproc: int) -> set[str]:
    sets = [set(json.loads(p.read_text())) if (p := out / f"rank{r}.json").exists() else set() for r in range(nproc)]
    return set.intersection(*sets)


def prepare(model_type: str, tp: int, root: Path, ep: bool = False) -> dict[str, Any]:
    """The tiny checkpoint and its artifact for ``tp`` (converted here); ``error`` if either cannot be made."""
    import reshard

    overrides = TP4_HEADS if tp == 4 else {}
    source = root / f"{model_type}-h{4 if tp == 4 else 2}"
    name = f"{model_type}-ep" if ep else model_type
    artifact = root / f"{name}-tp{tp}"
    case: dict[str, Any] = {
        "name": name,
        "source": str(source),
        "artifact": str(artifact),
        "attn": attention(model_type),
    }
    case |= {"ep": ep, "extra": REPRESENTATIVE.get(model_type, []) if not ep else []}
    try:
        if not source.exists():
            try:
                make_tiny_checkpoint(model_type, source, **overrides)
            except Exception:  # e.g. mamba's head sizes follow hidden_size: keep it, 4 heads of 8
                make_tiny_checkpoint(model_type, source, **{k: v for k, v in overrides.items() if k != "hidden_size"})
    except Exception as exc:
        return case | {"error": f"checkpoint: {type(exc).__name__}: {exc}"[:400]}
    try:
        reshard.convert(source, artifact, tp=tp, ep=tp if ep else 1, progress=False)
    except Exception as exc:
        return case | {"error": f"convert at tp {tp}: {type(exc).__name__}: {exc}"[:400]}
    return case


def verdict(result: dict[str, Any]) -> tuple[str, str, list[str]]:
    """``(status, reason, notes)``: pass when ours equals transformers' TP load (gradients allclose at 5e-3)."""
    if "error" in result:
        error = result["error"].splitlines()[0]
        if error.startswith("theirs: "):  # transformers' own TP model raises: nothing to compare with
            stage, _, message = error.removeprefix("theirs: ").partition(": ")
            checked = [k for k in ("forward", "generate") if k in result]
            equal = result.get("forward", {}).get("equal") and result.get("generate", {}).get("scores_equal")
            notes = [f"{' and '.join(checked)} equal to transformers' TP model"] if checked and equal else []
            if (alone := result.get("unsharded")) and alone["close"] and alone["tokens_equal"]:
                notes.append(
                    f"reshard's TP model vs unsharded: logits close (max {alone['max_diff']:.1e}), same tokens"
                )
            return "fail", f"transformers' own TP model fails in {stage} too ({message[:160]})", notes
        return "fail", error, []
    problems, notes = [], []
    params = result["params"]
    if not params["names_equal"] or params["different"]:
        problems.append(f"parameters differ: {(params['missing'] + params['extra'] + params['different'])[:3]}")
    if not result["forward"]["equal"]:
        problems.append(f"logits differ (max {result['forward']['max_diff']:.2e})")
    for key in ("generate", "static"):
        if key not in result:
            continue
        run = result[key]
        if not run["tokens_equal"] or not run["scores_equal"]:
            ulps = run.get("scores_max_ulps", float("inf"))
            problems.append(f"{key}: tokens or scores differ from step {run['first_bad_step']} (max {ulps:.1f} ulp)")
    back = result["backward"]
    if back.get("theirs_error"):
        notes.append(f"transformers' own TP backward fails ({back['theirs_error'][:120]}): gradients vs unsharded only")
        if back["grads_not_close_full"] or not back["loss_full_close"]:
            problems.append(f"backward vs unsharded: {back['grads_not_close_full'][:3]}")
    elif not back["loss_close"] or back["grads_not_close"] or back["grads_missing"]:
        problems.append(
            f"backward: loss {back['losses'][:2]}, grads {(back['grads_missing'] + back['grads_not_close'])[:3]}"
        )
    elif not back["loss_equal"] or back["grads_not_equal"]:
        notes.append(f"gradients allclose, not equal: {back['grads_not_equal'][:3]}")
    if "compile" in result and not result["compile"]["close"]:
        problems.append(f"compiled forward differs (max {result['compile']['max_diff']:.2e})")
    if not result["forward"]["full_close"]:
        notes.append(f"TP logits vs unsharded max diff {result['forward']['full_max_diff']:.2e}")
    if back["grads_not_close_full"] or not back["loss_full_close"]:
        notes.append(f"TP gradients vs unsharded not allclose: {back['grads_not_close_full'][:3]}")
    return ("fail" if problems else "pass"), "; ".join(problems), notes


def run_matrix(tp: int, root: Path) -> dict[str, tuple[str, str, list[str]]]:
    cases = [prepare(t, tp, root) for t in SELECTED]
    if tp == 2:
        cases += [prepare(t, tp, root, ep=True) for t in EP_TYPES if t in SELECTED]
    ready = [case for case in cases if "error" not in case]
    started = time.monotonic()
    launch(ready, tp, root / "out")
    elapsed = time.monotonic() - started
    results = json.loads((root / "out" / "rank0.json").read_text()) if ready else {}
    others = [json.loads((root / "out" / f"rank{r}.json").read_text()) for r in range(1, tp)] if ready else []
    verdicts = {}
    for case in cases:
        if "error" in case:
            verdicts[case["name"]] = ("unshardable" if "convert" in case["error"] else "fail", case["error"], [])
            continue
        verdicts[case["name"]] = worst([verdict(results[case["name"]]), *(verdict(o[case["name"]]) for o in others)])
        saved = root / "out" / f"{case['name']}-saved-rank0"
        if (
            "save" in case["extra"]
            and verdicts[case["name"]][0] == "pass"
            and not saved_equal(Path(case["source"]), saved)
        ):
            verdicts[case["name"]] = ("fail", "save_pretrained round trip differs from the checkpoint", [])
    verdicts["_elapsed"] = ("", f"{elapsed:.0f}", [])
    return verdicts


def worst(verdicts: list[tuple[str, str, list[str]]]) -> tuple[str, str, list[str]]:
    return next((v for v in verdicts if v[0] == "fail"), verdicts[0])


def saved_equal(source: Path, saved: Path) -> bool:
    def tensors(folder: Path) -> dict[str, torch.Tensor]:
        return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}

    original, back = tensors(source), tensors(saved)
    return sorted(original) == sorted(back) and all(torch.equal(back[k], v) for k, v in original.items())


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> dict[int, dict[str, tuple[str, str, list[str]]]]:
    root = tmp_path_factory.mktemp("matrix")
    runs = {tp: run_matrix(tp, root / f"tp{tp}") for tp in (2, 4)}
    if SELECTED == ALL_TYPES or os.environ.get("RESHARD_MATRIX_RECORD") == "1":
        write_results(runs)
    return runs


def write_results(runs: dict[int, dict[str, tuple[str, str, list[str]]]]) -> None:
    types: dict[str, Any] = {}
    for tp, verdicts in runs.items():
        for name, (status, reason, notes) in verdicts.items():
            if name.startswith("_"):
                continue
            entry = {"status": status, **({"reason": reason} if reason else {}), **({"notes": notes} if notes else {})}
            types.setdefault(name, {})[f"tp{tp}"] = entry
    for model_type, reason in SKIPPED.items():
        types[model_type] = {"skipped": reason}
    seconds = {f"tp{tp}": float(v["_elapsed"][1]) for tp, v in runs.items()}
    if SELECTED != ALL_TYPES:  # a few types recorded: every other entry, and the full run's timings, stay
        previous = json.loads(RESULTS.read_text())
        types = {**previous["types"], **types}
        seconds = previous["seconds"]
    document = {
        "transformers": __import__("transformers").__version__,
        "torch": torch.__version__,
        "seconds": seconds,
        "types": dict(sorted(types.items())),
    }
    RESULTS.write_text(json.dumps(document, indent=1) + "\n")


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("model_type", SELECTED + [f"{t}-ep" for t in EP_TYPES if t in SELECTED])
def test_matches_transformers_tp(matrix, model_type: str, tp: int) -> None:
    if model_type.endswith("-ep") and tp != 2:
        pytest.skip("EP backward at tp = ep = 2 only")
    status, reason, _ = matrix[tp][model_type]
    if status == "unshardable":
        pytest.skip(reason)
    if status != "pass" and model_type in KNOWN_FAILURES.get(f"tp{tp}", {}):
        pytest.xfail(KNOWN_FAILURES[f"tp{tp}"][model_type])
    assert status == "pass", reason
