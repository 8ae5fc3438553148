"""Serve a pre-sharded checkpoint with tensor parallelism: each rank maps only its own file of the artifact.

    reshard --tp 2 HuggingFaceTB/SmolLM2-135M -o ./SmolLM2-135M-tp2
    torchrun --nproc-per-node 2 examples/serve_tp.py ./SmolLM2-135M-tp2 --prompt "The capital of France is"

Offline, on the demo's artifact (``make demo`` writes it; its tokenizer knows the words ``w3`` to ``w8002``)::

    torchrun --nproc-per-node 2 examples/serve_tp.py demo-out/tiny-llama-tp2 --prompt "w5 w6 w7"

On CPU the processes talk over gloo and the weights stay views of the mapped rank files; on GPUs (nccl) each
rank's bytes are streamed from its file to its device. Rank 0 prints the greedy completion and the load time.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from transformers import AutoTokenizer

from reshard.loaders import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact", help="a folder written by `reshard --tp N` (manifest.json + rank files)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--verify", action="store_true", help="check every tensor's xxh3 while mapping")
    args = parser.parse_args()

    started = time.perf_counter()
    model = load_model(args.artifact, verify=args.verify)  # a 1-D tp mesh over the torchrun world
    loaded = time.perf_counter() - started
    tokenizer = AutoTokenizer.from_pretrained(args.artifact)
    inputs = tokenizer(args.prompt, return_tensors="pt").to(model.device)
    with torch.inference_mode():  # every rank runs the same greedy decoding; the TP wrappers all-reduce inside
        tokens = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        completion = str(tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True))
        print(f"loaded in {loaded:.2f}s on {dist.get_world_size() if dist.is_initialized() else 1} rank(s)")
        print(f"{args.prompt}{completion if completion.startswith(' ') else ' ' + completion}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
