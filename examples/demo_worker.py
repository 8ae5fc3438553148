"""Under torchrun: load an artifact with reshard and its source with transformers; compare; rank 0 reports.

torchrun --nproc-per-node 2 examples/demo_worker.py ARTIFACT SOURCE_CHECKPOINT
"""

from __future__ import annotations

import importlib
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from reshard.loaders import load_model


def main() -> int:
    artifact, source = sys.argv[1], sys.argv[2]
    # Both loaders pay the same one-time imports (transformers' modeling code, torch._dynamo behind DTensor): pay
    # them up front so that the two timings compare the loading itself. benchmarks/coldstart.py counts imports.
    importlib.import_module("torch._dynamo")
    importlib.import_module("transformers.modeling_utils")

    started = time.perf_counter()
    ours = load_model(artifact)
    reshard_seconds = time.perf_counter() - started

    from transformers import AutoModelForCausalLM, DistributedConfig

    dist.barrier()
    started = time.perf_counter()
    tp = DistributedConfig(tp_size=dist.get_world_size())  # the model's own ("auto") plan
    theirs = AutoModelForCausalLM.from_pretrained(source, distributed_config=tp)
    transformers_seconds = time.perf_counter() - started

    problems = []
    their_params = dict(theirs.named_parameters())
    for name, param in ours.named_parameters():
        other = their_params[name]
        if isinstance(param, DTensor) != isinstance(other, DTensor):
            problems.append(f"{name}: DTensor on one side only")
        elif isinstance(param, DTensor) and param.placements != other.placements:
            problems.append(f"{name}: placements {param.placements} vs {other.placements}")
        elif not torch.equal(
            param.to_local() if isinstance(param, DTensor) else param,
            other.to_local() if isinstance(other, DTensor) else other,
        ):
            problems.append(f"{name}: local values differ")
    tokens = torch.tensor([[1, 306, 4658, 278, 6593, 310, 2834, 338]])
    with torch.no_grad():
        logits_equal = torch.equal(ours(tokens).logits, theirs(tokens).logits)
        generated = ours.generate(tokens, max_new_tokens=8, do_sample=False)
        expected = theirs.generate(tokens, max_new_tokens=8, do_sample=False)
    ok = not problems and logits_equal and torch.equal(generated, expected)
    flags = torch.tensor([int(ok)])
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    if dist.get_rank() == 0:
        print(f"rank 0: reshard load_model {reshard_seconds:.2f}s, from_pretrained {transformers_seconds:.2f}s")
        print(
            f"rank 0: {len(their_params)} parameters compared, {len(problems)} differences; "
            f"logits identical: {logits_equal}; generated tokens identical: {torch.equal(generated, expected)}"
        )
        for problem in problems[:5]:
            print("  ", problem)
    dist.destroy_process_group()
    return 0 if flags.item() == 1 else 1


if __name__ == "__main__":
    sys.exit(main())
