"""Under torchrun: run the runtime cases of a JSON spec on this rank and write what it saw to ``OUT/rankR.json``.

argv: ``SPEC.json``, a list of cases, each ``{"name", "kind", ...}``:

- ``compare``: ``load_model(stripped[rank])``, a folder holding only this rank's file of the artifact, against
  ``from_pretrained(source, tp_plan="auto")`` in this process: per parameter the type, placements, local values,
  dtype and ``requires_grad``; buffers; tying; the TP attributes; logits and greedy ``generate``. Then
  ``load_state_dict`` of the same folder against the model's tensors, and where each local tensor lives (the
  mapped rank file, or a copy).
- ``mesh2d``: ``load_model(artifact, device_mesh=(dp, tp))``: local tensors against slices of the full checkpoint,
  logits against the other dp replica's and saved for the test to compare with a plain tp run's.
- ``error``: call ``load_state_dict(artifact, **kwargs)`` and record the exception every rank raised.
- ``raise``: the same, but print the exception to stderr and let it end the process (exit status non-zero).

The pytest process asserts; this script only observes, so one failing check does not hide the others.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, distribute_tensor

from reshard.loaders import load_model, load_state_dict
from tests.helpers.memory import mapped_file

PROMPT = torch.tensor([[1, 5, 77, 900, 1000, 3, 42, 500, 250]])


def main() -> None:
    warnings.simplefilter("ignore")
    spec = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    rank = int(os.environ["RANK"])
    results: dict[str, Any] = {}
    for case in spec:
        runner = {"compare": compare, "mesh2d": mesh2d, "error": error, "raise": raise_}[case["kind"]]
        results[case["name"]] = runner(case, out, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


def compare(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    theirs = AutoModelForCausalLM.from_pretrained(case["source"], tp_plan="auto")
    ours = load_model(case["stripped"][rank])
    their_params = dict(theirs.named_parameters(remove_duplicate=False))
    our_params = dict(ours.named_parameters(remove_duplicate=False))
    params = {name: _same(their_params[name], our_params[name]) for name in their_params.keys() & our_params.keys()}
    with torch.no_grad():
        their_logits, our_logits = theirs(PROMPT).logits, ours(PROMPT).logits
    if rank == 0:
        torch.save(our_logits, out / f"{case['name']}.logits.pt")
    their_tokens = theirs.generate(PROMPT, max_new_tokens=5, do_sample=False)
    our_tokens = ours.generate(PROMPT, max_new_tokens=5, do_sample=False)
    their_buffers, our_buffers = dict(theirs.named_buffers()), dict(ours.named_buffers())

    state = load_state_dict(case["stripped"][rank])
    state_checks = {
        name: _same(our_params[name], tensor) | {"file": str(mapped_file(tensor))} for name, tensor in state.items()
    }
    return {
        "param_names": [sorted(their_params), sorted(our_params)],
        "params": params,
        "buffers": {n: bool(torch.equal(t, our_buffers[n])) for n, t in their_buffers.items() if n in our_buffers},
        "buffer_names": [sorted(their_buffers), sorted(our_buffers)],
        "tied": [_tied(theirs), _tied(ours)],
        "attributes": {
            "tp_plan": theirs._tp_plan == ours._tp_plan,
            "tp_size": [theirs._tp_size, ours._tp_size],
            "training": [theirs.training, ours.training],
            "distributed_config": theirs.config.distributed_config == ours.config.distributed_config,
            "generation_config": theirs.generation_config.to_dict() == ours.generation_config.to_dict(),
            "device_mesh": str(ours._device_mesh),
            "extra": sorted(set(ours.__dict__) - set(theirs.__dict__)),
            "lacking": sorted(set(theirs.__dict__) - set(ours.__dict__)),
        },
        "logits_equal": bool(torch.equal(their_logits, our_logits)),
        "logits_max_diff": float((their_logits.float() - our_logits.float()).abs().max()),
        "tokens": [their_tokens.tolist(), our_tokens.tolist()],
        "state": state_checks,
        "rank_file": str(Path(case["stripped"][rank]).resolve()),
    }


def mesh2d(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    dp, tp = case["shape"]
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    ours = load_model(case["artifact"], device_mesh=mesh)
    full = dict(AutoModelForCausalLM.from_pretrained(case["source"]).named_parameters(remove_duplicate=False))
    params = {}
    for name, param in ours.named_parameters(remove_duplicate=False):
        if isinstance(param, DTensor):
            expected = distribute_tensor(full[name].detach(), mesh["tp"], param.placements, src_data_rank=None)
            equal = torch.equal(param.to_local(), expected.to_local())
            params[name] = {"mesh": param.device_mesh.mesh.tolist(), "equal": bool(equal)}
        else:
            params[name] = {"mesh": None, "equal": bool(torch.equal(param, full[name]))}
    with torch.no_grad():
        logits = ours(PROMPT).logits
    gathered = [torch.empty_like(logits) for _ in range(dp)]
    dist.all_gather(gathered, logits, group=mesh.get_group("dp"))
    if rank == 0:
        torch.save(logits, out / f"{case['name']}.logits.pt")
    return {
        "tp_coordinate": mesh.get_local_rank("tp"),
        "device_mesh": str(ours._device_mesh),
        "params": params,
        "replicas_equal": all(torch.equal(g, logits) for g in gathered),
    }


def error(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    try:
        load_state_dict(case["artifact"], **case.get("kwargs", {}))
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": ""}


def raise_(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    try:
        load_state_dict(case["artifact"])
    except Exception as exc:
        print(f"rank {rank} raised {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        raise
    return {}


def _same(reference: torch.Tensor, tensor: torch.Tensor) -> dict[str, bool]:
    is_dtensor = isinstance(reference, DTensor)
    same_layout = is_dtensor == isinstance(tensor, DTensor)
    if same_layout and is_dtensor:
        same_layout = (
            reference.placements == tensor.placements
            and reference.shape == tensor.shape
            and reference.device_mesh == tensor.device_mesh
        )
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    reference_local = reference.to_local() if is_dtensor else reference
    return {
        "layout": bool(same_layout),
        "values": bool(local.shape == reference_local.shape and torch.equal(local, reference_local)),
        "dtype": reference.dtype == tensor.dtype,
        "requires_grad": reference.requires_grad == tensor.requires_grad,
    }


def _tied(model: Any) -> bool:
    return model.get_output_embeddings().weight is model.get_input_embeddings().weight


if __name__ == "__main__":
    main()
