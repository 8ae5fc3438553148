"""Under torchrun: the TensorParallelTesterMixin checks on models loaded through reshard, one case per model type.

argv: ``SPEC.json`` (a list of cases) and ``OUT``. Each case: ``name``, ``source`` (the tiny checkpoint),
``artifact`` (converted for this world size in the pytest process), ``attn``, optional ``ep`` (an expert-parallel
artifact, compared with ``DistributedConfig(tp_size=N, ep_size=N)``) and ``extra`` (the representative checks:
``compile``, ``static``, ``save``). Per case, on every rank:

- ``load_model(artifact)`` against ``from_pretrained(source, distributed_config=DistributedConfig(tp_size=N))``
  (ours, theirs) and ``from_pretrained(source)`` unsharded (full): parameter names, placements and local values;
- then ours and theirs copied to aligned storage (``realign``: BLAS kernels pick by address), so that what follows
  compares computations, not where each loader happened to put its bytes;
- forward in eval mode on a 2x64 input: logits of ours equal theirs, and close to full's;
- greedy generate of 25 tokens with per-step scores: ours equal theirs;
- backward in train mode (labels = input): loss and every gradient of ours against theirs (equal, or allclose at
  5e-3 like the mixin where reductions differ) and against full (allclose at 5e-3);
- extras: torch.compile forward, static-cache generate, save_pretrained (rank 0's copy, compared by the test).

Results go to ``OUT/rankR.json`` after every case, so a crash or hang leaves the cases before it recorded; a case
that raises is recorded with its error on every rank (all ranks agree on the outcome before the next case).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from reshard.loaders import load_model

TOLERANCE = 5e-3
STAGE = [""]  # what the case was doing (``theirs: forward``...), recorded with an error


def main() -> None:
    warnings.simplefilter("ignore")
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=int(os.environ.get("MATRIX_TIMEOUT", "120"))))
    path = out / f"rank{rank}.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    for case in spec:
        started = time.monotonic()
        result: dict[str, Any] = {}  # what a case that raises checked before it did stays recorded
        try:
            run_case(case, out, rank, result)
        except Exception as exc:
            result["error"] = f"{STAGE[0]}: {type(exc).__name__}: {exc}"[:600]
            result["trace"] = traceback.format_exc()[-3000:]
        errors: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(errors, result.get("error"))
        if any(errors) and "error" not in result:
            result["error"] = f"another rank failed: {next(e for e in errors if e)}"
        result["seconds"] = round(time.monotonic() - started, 1)
        results[case["name"]] = result
        path.write_text(json.dumps(results, indent=1))
        release_groups()
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see runtime_worker.py: gloo's thread at interpreter finalization


def release_groups() -> None:
    """Destroy the process groups the case created (transformers' device mesh, reshard's): each gloo group keeps
    three threads alive, and a hundred cases left thousands of them, slowing every later case and the machine."""
    from torch.distributed.distributed_c10d import _world

    gc.collect()
    for group in list(_world.pg_map):
        if group is not dist.group.WORLD:
            dist.destroy_process_group(group)
    gc.collect()


def run_case(case: dict[str, Any], out: Path, rank: int, result: dict[str, Any]) -> None:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    size = dist.get_world_size()
    kwargs = {"attn_implementation": case["attn"], "experts_implementation": "eager"}
    distributed = DistributedConfig(tp_size=size, ep_size=size if case.get("ep") else 1)
    STAGE[0] = "theirs: load"
    try:
        theirs = AutoModelForCausalLM.from_pretrained(case["source"], distributed_config=distributed, **kwargs)
    except Exception:
        unsharded_only(case, kwargs, result)  # nothing of transformers' to compare with: the unsharded model then
        STAGE[0] = "theirs: load"
        raise
    STAGE[0] = "ours: load"
    ours = load_model(case["artifact"], **kwargs)
    STAGE[0] = "unsharded: load"
    full = AutoModelForCausalLM.from_pretrained(case["source"], **kwargs)
    for model in (theirs, ours, full):
        model.eval()
    result["params"] = params(theirs, ours)
    for model in (theirs, ours):
        realign(model)
    vocab = full.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (2, 64), generator=torch.Generator().manual_seed(0))

    with torch.no_grad():
        their_logits, our_logits, full_logits = (
            _run(who, m, "forward", m, ids).logits for who, m in _three(theirs, ours, full)
        )
    result["forward"] = {
        "equal": bool(torch.equal(their_logits, our_logits)),
        "max_diff": _diff(their_logits, our_logits),
        "full_close": bool(torch.allclose(our_logits, full_logits, atol=TOLERANCE, rtol=TOLERANCE)),
        "full_max_diff": _diff(full_logits, our_logits),
    }
    result["generate"] = generate(theirs, ours, ids)
    result["backward"] = backward(theirs, ours, full, ids)
    extra = case.get("extra", [])
    STAGE[0] = "extras"
    if "static" in extra:
        result["static"] = generate(theirs, ours, ids, cache_implementation="static")
    if "compile" in extra:
        compiled = torch.compile(ours)
        with torch.no_grad():
            logits = compiled(ids).logits
        result["compile"] = {
            "close": bool(torch.allclose(logits, their_logits, atol=TOLERANCE, rtol=TOLERANCE)),
            "max_diff": _diff(their_logits, logits),
        }
    if "save" in extra:
        ours.save_pretrained(out / f"{case['name']}-saved-rank{rank}")
        result["saved"] = True


def unsharded_only(case: dict[str, Any], kwargs: dict[str, Any], result: dict[str, Any]) -> None:
    """Where transformers' own TP load raises: ours against the unsharded model alone (logits allclose at
    ``TOLERANCE``, the same 25 greedy tokens), recorded as ``result["unsharded"]``."""
    from transformers import AutoModelForCausalLM

    STAGE[0] = "ours: load"
    ours = load_model(case["artifact"], **kwargs).eval()
    STAGE[0] = "unsharded: load"
    full = AutoModelForCausalLM.from_pretrained(case["source"], **kwargs).eval()
    ids = torch.randint(
        3, full.config.get_text_config().vocab_size, (2, 64), generator=torch.Generator().manual_seed(0)
    )
    settings = {"max_new_tokens": 25, "do_sample": False}
    with torch.no_grad():
        our_logits = _run("ours", ours, "forward", ours, ids).logits
        full_logits = _run("unsharded", full, "forward", full, ids).logits
        our_tokens = _run("ours", ours, "generate", ours.generate, ids, **settings)
        full_tokens = _run("unsharded", full, "generate", full.generate, ids, **settings)
    result["unsharded"] = {
        "close": bool(torch.allclose(our_logits, full_logits, atol=TOLERANCE, rtol=TOLERANCE)),
        "max_diff": _diff(our_logits, full_logits),
        "tokens_equal": bool(torch.equal(our_tokens, full_tokens)),
    }


def params(theirs: Any, ours: Any) -> dict[str, Any]:
    their_params = dict(theirs.named_parameters(remove_duplicate=False))
    our_params = dict(ours.named_parameters(remove_duplicate=False))
    bad = []
    for name in sorted(their_params.keys() & our_params.keys()):
        a, b = their_params[name], our_params[name]
        same = isinstance(a, DTensor) == isinstance(b, DTensor)
        if same and isinstance(a, DTensor):
            same = a.placements == b.placements and a.shape == b.shape
        same = same and a.dtype == b.dtype and torch.equal(_local(a), _local(b))
        if not same:
            bad.append(name)
    return {
        "names_equal": sorted(their_params) == sorted(our_params),
        "missing": sorted(their_params.keys() - our_params.keys()),
        "extra": sorted(our_params.keys() - their_params.keys()),
        "different": bad,
    }


def realign(model: Any) -> None:
    """Copy every local parameter and buffer into fresh (64-byte aligned) storage, ties kept. Both models' values
    are compared exactly before; this is for the computations after. OpenBLAS picks its gemv and small-gemm kernels
    by the operand's address, so the same weights at another address modulo 64 give logits and scores an ulp or
    two apart: transformers' TP load leaves slices of its read buffers at 16-56 mod 64, reshard's tensors sit where
    the rank file puts them. Copied to aligned storage, the two must compute bit for bit alike."""
    copies: dict[int, torch.Tensor] = {}  # by the original's id: a tied tensor stays one tensor
    with torch.no_grad():
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, tensor in table.items():
                    if tensor is not None:
                        table[name] = copies.setdefault(id(tensor), _aligned_copy(tensor))


def _aligned_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A new tensor (a DTensor rebuilt around a copy of its local tensor: re-storing a DTensor's local tensor in
    place trips torch.compile) equal to ``tensor``, a parameter where it was one."""
    if isinstance(tensor, DTensor):
        local = tensor.to_local().clone()
        copy = DTensor.from_local(
            local, tensor.device_mesh, tensor.placements, shape=tensor.shape, stride=tensor.stride()
        )
    else:
        copy = tensor.detach().clone()
    if isinstance(tensor, torch.nn.Parameter):
        return torch.nn.Parameter(copy, requires_grad=tensor.requires_grad)
    return copy


def generate(theirs: Any, ours: Any, ids: torch.Tensor, **options: Any) -> dict[str, Any]:
    settings = {"max_new_tokens": 25, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}
    their_out = _run("theirs", theirs, "generate", theirs.generate, ids, **settings, **options)
    our_out = _run("ours", ours, "generate", ours.generate, ids, **settings, **options)
    pairs = list(zip(their_out.scores, our_out.scores, strict=False))
    steps = [bool(torch.equal(a, b)) for a, b in pairs]
    ulps = [_ulps(a, b) for a, b in pairs]
    return {
        "tokens_equal": bool(torch.equal(their_out.sequences, our_out.sequences)),
        "new_tokens": int(our_out.sequences.shape[1] - ids.shape[1]),
        "scores_equal": len(their_out.scores) == len(our_out.scores) and all(steps),
        "scores_max_ulps": max(ulps, default=0.0),
        "first_bad_step": next((i for i, ok in enumerate(steps) if not ok), None),
    }


def _ulps(a: torch.Tensor, b: torch.Tensor) -> float:
    """The largest difference of two score tensors in float32 ulps of the larger magnitude (inf when not finite
    alike or of other shapes)."""
    if a.shape != b.shape or not torch.equal(torch.isfinite(a), torch.isfinite(b)):
        return float("inf")
    finite = torch.isfinite(a)
    if not bool(torch.equal(a[~finite], b[~finite])):
        return float("inf")
    a, b = a[finite].float(), b[finite].float()
    if a.numel() == 0:
        return 0.0
    spacing = torch.finfo(torch.float32).eps * torch.maximum(a.abs(), b.abs()).clamp_min(1.0)
    return float(((a - b).abs() / spacing).max())


def backward(theirs: Any, ours: Any, full: Any, ids: torch.Tensor) -> dict[str, Any]:
    """Loss and gradients in train mode. Where transformers' own TP backward raises, ours is compared with the
    unsharded model's only (``theirs_error`` says why)."""
    losses: list[torch.Tensor | None] = []
    theirs_error = None
    for who, model in _three(theirs, ours, full):
        model.train()
        model.zero_grad(set_to_none=True)
        STAGE[0] = f"{who}: backward"
        try:
            loss = model(ids, labels=ids).loss
            loss.backward()
        except Exception as exc:
            if who != "theirs":
                if theirs_error is not None:
                    STAGE[0] = "theirs: backward"  # it fails as transformers' own TP model does
                raise
            theirs_error, loss = f"{type(exc).__name__}: {exc}"[:300], None
            model.zero_grad(set_to_none=True)
        losses.append(None if loss is None else loss.detach())
        model.eval()
    their_loss, our_loss, full_loss = losses
    assert our_loss is not None and full_loss is not None
    their_params = dict(theirs.named_parameters())
    full_params = dict(full.named_parameters())
    not_equal, not_close, not_close_full, missing = [], [], [], []
    for name, param in ours.named_parameters():
        grad, their_grad = param.grad, their_params[name].grad
        if theirs_error is None and (grad is None) != (their_grad is None):
            missing.append(name)
            continue
        if grad is None:
            continue
        if theirs_error is None:
            mine, reference = _local(grad), _local(their_grad)
            if not torch.equal(mine, reference):
                not_equal.append(name)
                if not torch.allclose(mine, reference, atol=TOLERANCE, rtol=TOLERANCE):
                    not_close.append(name)
        whole = grad.full_tensor() if isinstance(grad, DTensor) else grad
        full_grad = full_params[name].grad
        if full_grad is None or not torch.allclose(whole, full_grad, atol=TOLERANCE, rtol=TOLERANCE):
            not_close_full.append(name)
    reference_loss = full_loss if their_loss is None else their_loss
    return {
        "theirs_error": theirs_error,
        "loss_equal": bool(torch.equal(reference_loss, our_loss)),
        "loss_close": bool(torch.allclose(reference_loss, our_loss, atol=TOLERANCE, rtol=TOLERANCE)),
        "loss_full_close": bool(torch.allclose(full_loss, our_loss, atol=TOLERANCE, rtol=TOLERANCE)),
        "losses": [None if their_loss is None else float(their_loss), float(our_loss), float(full_loss)],
        "grads_not_equal": not_equal,
        "grads_not_close": not_close,
        "grads_not_close_full": not_close_full,
        "grads_missing": missing,
    }


def _three(theirs: Any, ours: Any, full: Any) -> list[tuple[str, Any]]:
    return [("theirs", theirs), ("ours", ours), ("unsharded", full)]


def _run(who: str, model: Any, what: str, function: Any, *args: Any, **kwargs: Any) -> Any:
    STAGE[0] = f"{who}: {what}"
    return function(*args, **kwargs)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.shape == b.shape else float("inf")


if __name__ == "__main__":
    main()
