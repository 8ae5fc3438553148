"""Under torchrun: run the runtime cases of a JSON spec on this rank and write what it saw to ``OUT/rankR.json``.

argv: ``SPEC.json``, a list of cases, each ``{"name", "kind", ...}``:

- ``compare``: ``load_model(stripped[rank])``, a folder holding only this rank's file of the artifact, against
  ``from_pretrained(source, tp_plan="auto")`` in this process: per parameter the type, placements, local values,
  dtype and ``requires_grad``; buffers; tying; the TP attributes; logits and greedy ``generate``. Then
  ``load_state_dict`` of the same folder against the model's tensors, and where each local tensor lives (the
  mapped rank file, or a copy). Optional: ``experts_implementation`` (both sides); ``ep`` (an expert-parallel
  artifact, against ``from_pretrained(source, distributed_config=DistributedConfig(tp_size=N, ep_size=N))``);
  ``tp_plan`` (an artifact converted with that custom plan, against ``DistributedConfig(tp_size=N, tp_plan=...)``).
- ``caller_ep_mesh``: an expert-parallel artifact loaded on a caller's ``(dp, tp)`` mesh whose ``tp`` dimension is
  also flattened into ``ep``: which mesh and process group every DTensor lives on; logits saved for the test.
- ``unsharded``: ``load_model(artifact)`` (e.g. with replicated KV heads, or tp x pp stages, which transformers
  cannot load) against ``from_pretrained(source)`` without any parallelism in this process: logits (closeness),
  greedy ``generate`` and which tensors the rank holds. Optional: ``mesh`` (load on that device mesh),
  ``experts_implementation`` (both sides),
  ``stripped`` (``{rank: folder}``, folders holding only that rank's file).
- ``compare`` with ``pp``: a pipeline artifact against ``DistributedConfig(pp_size=pp)``.
- ``mesh2d``: ``load_model(artifact, device_mesh=(dp, tp))``: local tensors against slices of the full checkpoint,
  logits against the other dp replica's and saved for the test to compare with a plain tp run's.
- ``error``: call ``load_state_dict(artifact, **kwargs)`` and record the exception every rank raised; with
  ``mesh`` (``{"shape": [...], "names": [...]}``) on that device mesh.
- ``model_error``: the same with ``load_model(artifact)``.
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
from safetensors.torch import save_file
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
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
        runners = {"compare": compare, "mesh2d": mesh2d, "error": error, "raise": raise_, "model_error": model_error}
        runners |= {"caller_ep_mesh": caller_ep_mesh, "unsharded": unsharded, "save": save}
        runner = runners[case["kind"]]
        results[case["name"]] = runner(case, out, rank)
    (out / f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()
    # gloo's worker thread may still be releasing the last collective's work, which takes the GIL; during interpreter
    # finalization CPython ends that thread inside a noexcept destructor -> std::terminate, a rare SIGABRT after all
    # was done (torch + gloo + CPython, with or without reshard: pytorch/pytorch#190489). Skip finalization.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def save(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    """``load_model(artifact).save_pretrained(out/NAME-rankR)`` on every rank (saving gathers the DTensors)."""
    model = load_model(case["artifact"])
    model.save_pretrained(out / f"{case['name']}-rank{rank}")
    return {"saved": True}


def compare(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    extra = {"experts_implementation": case["experts_implementation"]} if "experts_implementation" in case else {}
    size = int(os.environ["WORLD_SIZE"])  # the group does not exist yet: from_pretrained starts it
    if case.get("ep"):
        parallel: dict[str, Any] = {"distributed_config": DistributedConfig(tp_size=size, ep_size=size)}
    elif case.get("pp"):  # pipeline stages alone: transformers' own pipeline load
        parallel = {"distributed_config": DistributedConfig(pp_size=case["pp"])}
    elif "tp_plan" in case:  # a custom plan: transformers merges it into the model's own
        parallel = {"distributed_config": DistributedConfig(tp_size=size, tp_plan=case["tp_plan"])}
    else:
        parallel = {"tp_plan": "auto"}
    theirs = AutoModelForCausalLM.from_pretrained(case["source"], **parallel, **extra)
    ours = load_model(case["stripped"][rank], **extra)
    their_params = dict(theirs.named_parameters(remove_duplicate=False))
    our_params = dict(ours.named_parameters(remove_duplicate=False))
    params = {name: _same(their_params[name], our_params[name]) for name in their_params.keys() & our_params.keys()}
    with torch.no_grad():
        their_logits, our_logits = theirs(PROMPT).logits, ours(PROMPT).logits
    if rank == 0:
        save_file({"logits": our_logits.contiguous()}, out / f"{case['name']}.logits.safetensors")
    their_tokens = theirs.generate(PROMPT, max_new_tokens=5, do_sample=False)
    our_tokens = ours.generate(PROMPT, max_new_tokens=5, do_sample=False)
    their_buffers, our_buffers = dict(theirs.named_buffers()), dict(ours.named_buffers())

    state = load_state_dict(case["stripped"][rank])
    ours_by_name = {**our_buffers, **our_params}  # persistent buffers (e.g. deepseek's e_score_correction_bias) too
    state_checks = {
        name: _same(ours_by_name[name], tensor) | {"file": str(mapped_file(tensor))} for name, tensor in state.items()
    }
    return {
        "param_names": [sorted(their_params), sorted(our_params)],
        "params": params,
        "buffers": {n: bool(torch.equal(t, our_buffers[n])) for n, t in their_buffers.items() if n in our_buffers},
        "buffer_names": [sorted(their_buffers), sorted(our_buffers)],
        "tied": [_tied(theirs), _tied(ours)],
        "attributes": {
            "tp_plan": theirs._tp_plan == ours._tp_plan,
            "ep_plan": theirs._ep_plan == ours._ep_plan,
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
        "meshes": {name: _mesh_names(param) for name, param in our_params.items()},
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
        save_file({"logits": logits.contiguous()}, out / f"{case['name']}.logits.safetensors")
    return {
        "tp_coordinate": mesh.get_local_rank("tp"),
        "device_mesh": str(ours._device_mesh),
        "params": params,
        "replicas_equal": all(torch.equal(g, logits) for g in gathered),
    }


def caller_ep_mesh(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    dp, tp = case["shape"]
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    mesh["tp"]._flatten("ep")  # the caller's own ep dimension: the tp ranks, on a process group of its own
    extra = {"experts_implementation": case["experts_implementation"]} if "experts_implementation" in case else {}
    ours = load_model(case["artifact"], device_mesh=mesh, **extra)
    with torch.no_grad():
        logits = ours(PROMPT).logits
    if rank == 0:
        save_file({"logits": logits.contiguous()}, out / f"{case['name']}.logits.safetensors")
    groups = {n: p.device_mesh.get_group().group_name for n, p in ours.named_parameters() if isinstance(p, DTensor)}
    return {
        "meshes": {name: _mesh_names(param) for name, param in ours.named_parameters()},
        "groups": groups,
        "ep_group": mesh["ep"].get_group().group_name,
        "tp_group": mesh["tp"].get_group().group_name,
        "ep_ranks": mesh["ep"].mesh.tolist(),
    }


def unsharded(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    extra = {"experts_implementation": case["experts_implementation"]} if "experts_implementation" in case else {}
    original = AutoModelForCausalLM.from_pretrained(case["source"], **extra)
    kwargs = {}
    if "mesh" in case:
        shape, names = tuple(case["mesh"]["shape"]), tuple(case["mesh"]["names"])
        kwargs["device_mesh"] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    ours = load_model(case.get("stripped", {}).get(str(rank), case["artifact"]), **kwargs, **extra)
    state = load_state_dict(case.get("stripped", {}).get(str(rank), case["artifact"]), **kwargs)
    with torch.no_grad():
        their_logits, our_logits = original(PROMPT).logits, ours(PROMPT).logits
    if rank == 0:
        logits = {"original": their_logits.contiguous(), "ours": our_logits.contiguous()}
        save_file(logits, out / f"{case['name']}.logits.safetensors")
    their_tokens = original.generate(PROMPT, max_new_tokens=5, do_sample=False)
    our_tokens = ours.generate(PROMPT, max_new_tokens=5, do_sample=False)
    return {
        "kv_heads": [original.config.num_key_value_heads, ours.config.num_key_value_heads],
        "k_proj": [list(_local(v).shape) for k, v in ours.named_parameters() if k.endswith("self_attn.k_proj.weight")][
            :1
        ],
        "logits_max_diff": float((their_logits - our_logits).abs().max()),
        "tokens": [their_tokens.tolist(), our_tokens.tolist()],
        "state": sorted(state),
        "params": sorted(name for name, _ in ours.named_parameters()),
        "device_mesh": str(ours._device_mesh),
    }


def error(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    kwargs = dict(case.get("kwargs", {}))
    if "mesh" in case:
        shape, names = tuple(case["mesh"]["shape"]), tuple(case["mesh"]["names"])
        kwargs["device_mesh"] = init_device_mesh("cpu", shape, mesh_dim_names=names)
    try:
        load_state_dict(case["artifact"], **kwargs)
    except Exception as exc:
        return {"type": type(exc).__name__, "message": str(exc)}
    return {"type": None, "message": ""}


def model_error(case: dict[str, Any], out: Path, rank: int) -> dict[str, Any]:
    try:
        load_model(case["artifact"])
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


def _mesh_names(tensor: torch.Tensor) -> list[str] | None:
    """The mesh dimension names of a DTensor (``["tp"]``, ``["ep"]``), ``None`` for a plain tensor."""
    if not isinstance(tensor, DTensor):
        return None
    mesh: DeviceMesh = tensor.device_mesh
    return list(mesh.mesh_dim_names or [])


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _tied(model: Any) -> bool:
    output, input_ = model.get_output_embeddings(), model.get_input_embeddings()  # a pipeline stage may lack one
    return getattr(output, "weight", None) is not None and output.weight is getattr(input_, "weight", None)


if __name__ == "__main__":
    main()
