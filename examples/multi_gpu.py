"""Multi-process DPO with fastdpo: DDP, FSDP2 or a vocabulary-parallel LM head, on a tiny random Llama.

    torchrun --nproc_per_node=2 examples/multi_gpu.py --engine ddp        # or fsdp2, tp
    accelerate launch --multi_gpu --num_processes=2 examples/multi_gpu.py --engine fsdp2

nccl on GPUs (one per process), gloo on CPU. ddp / fsdp2: data parallel, every rank takes its share of each
global batch from fastdpo.sharding.PreferenceShardSampler (equal pair counts, balanced tokens). tp: every
rank runs the whole batch with its slice of the LM head's vocabulary (fastdpo.distributed.shard_lm_head).
Each step packs the rank's pairs with shared prompts, accumulates gradients over --micro-batches and takes
one AdamW step; rank 0 prints the loss averaged over ranks.
"""
import argparse
import copy
import gc
import os

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.model import model_loss
from fastdpo.packing import pack_pairs
from fastdpo.distributed import shard_lm_head
from fastdpo.sharding import PreferenceShardSampler, pair_token_lengths

VOCAB = 128


class DPOStep(torch.nn.Module):
    """The policy with the DPO loss as its forward, so that DDP / FSDP2 hooks see the whole computation."""

    def __init__(self, policy):
        super().__init__()
        self.policy = policy

    def forward(self, batch, ref_model, beta):
        return model_loss(self.policy, batch, ref_model=ref_model, beta=beta).loss


def synthetic_pairs(n, seed):
    """Chosen responses count up from the last prompt token; rejected ones are random."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for _ in range(n):
        prompt = torch.randint(1, VOCAB, (int(torch.randint(4, 24, (1,), generator=g)),), generator=g).tolist()
        length = int(torch.randint(2, 16, (1,), generator=g))
        pairs.append({"prompt_input_ids": prompt,
                      "chosen_input_ids": [1 + (prompt[-1] + k) % (VOCAB - 1) for k in range(length)],
                      "rejected_input_ids": torch.randint(1, VOCAB, (length,), generator=g).tolist()})
    return pairs


def pack(pairs, max_tokens):
    return pack_pairs(*([p[k] for p in pairs] for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")),
                      max_tokens=max_tokens, shared_prompt=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=("ddp", "fsdp2", "tp"), default="ddp")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--pairs-per-rank", type=int, default=8)
    ap.add_argument("--micro-batches", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=2e-3)
    args = ap.parse_args()
    if args.pairs_per_rank % args.micro_batches:
        raise SystemExit("--pairs-per-rank must be a multiple of --micro-batches")

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda" if cuda else "cpu")

    torch.manual_seed(0)  # the same initial policy on every rank
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    policy = LlamaForCausalLM(config).to(device)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    model = DPOStep(policy)
    if args.engine == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif args.engine == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in policy.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(device.type, (world,))
        shard_lm_head(policy, mesh)
        shard_lm_head(reference, mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)

    pairs = synthetic_pairs(args.pairs_per_rank * world * args.steps, seed=1)
    data_ranks = (1, 0) if args.engine == "tp" else (world, rank)  # tp: every rank takes the whole batch
    sampler = PreferenceShardSampler(pair_token_lengths(pairs), pairs_per_rank=args.pairs_per_rank * world
                                     // data_ranks[0], num_replicas=data_ranks[0], rank=data_ranks[1], seed=0)
    for step, indices in enumerate(sampler):
        micro = [indices[k::args.micro_batches] for k in range(args.micro_batches)]
        total = torch.zeros((), device=device)
        for k, part in enumerate(micro):
            last = k == len(micro) - 1
            if args.engine == "fsdp2":
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if args.engine == "ddp" and not last else torch.enable_grad()
            with sync:
                loss = model(pack([pairs[i] for i in part], args.max_tokens).to(device), reference, args.beta)
                (loss / len(micro)).backward()
            total += loss.detach() / len(micro)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.engine != "tp":
            dist.all_reduce(total)
            total /= world
        if rank == 0:
            print(f"step {step:3d}  loss {total.item():.4f}", flush=True)
    # DDP / FSDP2 state holds the process group: free it on every rank before the group goes, or a rank can
    # hang or abort at exit
    del model, optimizer, policy, reference
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
