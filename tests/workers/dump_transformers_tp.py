"""Under torchrun: load each checkpoint with transformers' own TP (tp_plan="auto") and save this rank's local tensors.

argv: a JSON file ``[[source_dir, out_prefix, ep_size], ...]``; writes ``{out_prefix}.rank{R}.safetensors`` holding
every parameter's local shard (``to_local()`` for DTensors) plus ``{out_prefix}.rank{R}.json`` with placements and
the name of the mesh each DTensor lives on (``tp``, or ``ep`` for experts under expert parallelism).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from transformers import AutoModelForCausalLM
from transformers.distributed import DistributedConfig


def describe(placement: object) -> list[object]:
    """A placement as JSON: ``["shard", dim]``, ``["strided_shard", dim, split_factor]`` or ``["replicate"]``."""
    if isinstance(placement, _StridedShard):
        return ["strided_shard", placement.dim, placement.split_factor]
    if isinstance(placement, Shard):
        return ["shard", placement.dim]
    return [type(placement).__name__.lower()]


def main() -> None:
    with open(sys.argv[1]) as handle:
        jobs = json.load(handle)
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    for source, prefix, ep in jobs:
        if ep > 1:
            config = DistributedConfig(tp_size=world, ep_size=ep)
            model = AutoModelForCausalLM.from_pretrained(source, distributed_config=config)
        else:
            model = AutoModelForCausalLM.from_pretrained(source, tp_plan="auto")
        tensors, placements = {}, {}
        for name, param in model.state_dict(keep_vars=True).items():  # parameters and persistent buffers
            local = param.to_local() if isinstance(param, DTensor) else param.data
            tensors[name] = local.detach().clone().contiguous()
            if isinstance(param, DTensor):
                placements[name] = [[*describe(p), param.device_mesh.mesh_dim_names[0]] for p in param.placements]
            else:
                placements[name] = None
        save_file(tensors, f"{prefix}.rank{rank}.safetensors")
        with open(f"{prefix}.rank{rank}.json", "w") as handle:
            json.dump(placements, handle)
        del model
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
