"""Data-parallel sharding of a preference dataset: every rank gets the same number of pairs per step and
about the same number of tokens (the per-rank token count decides the step time: ranks wait for the slowest).

    sampler = PreferenceShardSampler(pair_token_lengths(pairs), pairs_per_rank=4, seed=0)
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        for indices in sampler:                       # this rank's pair indices for one step
            batch = pack_rows([pairs[i] for i in indices], max_tokens=4096, shared_prompt=True)

Each epoch the pair order is shuffled with seed + epoch (as torch's DistributedSampler), cut into global
batches of pairs_per_rank x world_size pairs, and each global batch is split across ranks by a
cardinality-constrained greedy (longest pair first, to the rank with the fewest tokens that still has
room; ties to the lower rank), so the split is deterministic and the same on every rank without
communication. Equal pair counts keep fastdpo.loss's per-rank mean over pairs, averaged by DDP/FSDP,
equal to the global mean. A final global batch with fewer than pairs_per_rank x world_size pairs is left
out of the epoch (with shuffling, a different one each epoch).

Every rank must build its sampler from the same lengths, seed, pairs_per_rank and shuffle (otherwise ranks
draw overlapping pairs): with an initialised process group the constructor compares them across ranks (one
all_gather_object, so every rank must construct it) and raises on every rank if they differ.

This module is data handling, beside fastdpo/packing.py (whose pair lengths and row parsing it uses).
"""
from typing import Sequence

import torch

from .packing import pair_length, rows_to_pairs

__all__ = ["pair_token_lengths", "balanced_split", "PreferenceShardSampler"]


def pair_token_lengths(pairs, *, shared_prompt=True):
    """Tokens each pair occupies in a packed row; pairs as fastdpo.packing.rows_to_pairs takes them (TRL 1.16
    rows prompt_ids / chosen_ids / rejected_ids, TRL < 1.0 names, (prompt, chosen, rejected) tuples, or a
    datasets.Dataset)."""
    return [pair_length(len(prompt), len(chosen), len(rejected), shared_prompt)
            for prompt, chosen, rejected in zip(*rows_to_pairs(pairs))]


def balanced_split(lengths: Sequence[int], num_ranks: int) -> list[list[int]]:
    """Split positions 0..n-1 (n divisible by num_ranks) into num_ranks groups of n / num_ranks positions with
    balanced sums of `lengths`. Deterministic; the largest group sum exceeds the smallest by at most
    max(lengths)."""
    n = len(lengths)
    if num_ranks < 1 or n % num_ranks:
        raise ValueError(f"the number of pairs ({n}) must be a multiple of num_ranks ({num_ranks})")
    per_rank = n // num_ranks
    groups, tokens = [[] for _ in range(num_ranks)], [0] * num_ranks
    for position in sorted(range(n), key=lambda i: -lengths[i]):  # stable: ties keep their order
        rank = min((r for r in range(num_ranks) if len(groups[r]) < per_rank), key=lambda r: tokens[r])
        groups[rank].append(position)
        tokens[rank] += lengths[position]
    return groups


class PreferenceShardSampler(torch.utils.data.Sampler):
    """Batch sampler: yields this rank's list of pair indices for each step (use as DataLoader(batch_sampler=)).

    lengths: tokens per pair (pair_token_lengths). num_replicas / rank default to the initialised process
    group. shuffle=False keeps the dataset order (the split across ranks is still token-balanced).
    """

    def __init__(self, lengths: Sequence[int], *, pairs_per_rank: int, num_replicas=None, rank=None, seed=0,
                 shuffle=True):
        if num_replicas is None or rank is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError("num_replicas and rank are required when no process group is initialised")
            num_replicas = dist.get_world_size() if num_replicas is None else num_replicas
            rank = dist.get_rank() if rank is None else rank
        if not (0 <= rank < num_replicas):
            raise ValueError(f"rank must lie in [0, num_replicas={num_replicas}), got {rank}")
        if pairs_per_rank < 1:
            raise ValueError(f"pairs_per_rank must be >= 1, got {pairs_per_rank}")
        if any(length < 1 for length in lengths):
            raise ValueError("lengths must be positive token counts")
        self.lengths, self.pairs_per_rank = list(lengths), pairs_per_rank
        self.num_replicas, self.rank, self.seed, self.shuffle = num_replicas, rank, seed, shuffle
        self.epoch = 0
        self.global_batch = pairs_per_rank * num_replicas
        if len(self.lengths) < self.global_batch:
            raise ValueError(f"the dataset has {len(self.lengths)} pairs, fewer than one global batch of "
                             f"pairs_per_rank x num_replicas = {self.global_batch}")
        self._check_same_on_every_rank()

    def _check_same_on_every_rank(self):
        """With an initialised process group: raise on every rank unless all ranks drew the same sampler."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        mine = {"seed": self.seed, "shuffle": self.shuffle, "pairs_per_rank": self.pairs_per_rank,
                "num_replicas": self.num_replicas, "lengths": hash(tuple(self.lengths))}
        everyone = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        differing = sorted(k for k in mine if len({ranks[k] for ranks in everyone}) > 1)
        if differing:
            raise ValueError(f"PreferenceShardSampler: {', '.join(differing)} differ across ranks "
                             f"({[{k: ranks[k] for k in differing} for ranks in everyone]} in rank order); every rank "
                             f"must pass the same lengths, seed, pairs_per_rank and shuffle, or ranks draw "
                             f"overlapping pairs")

    def set_epoch(self, epoch: int):
        """Reshuffle for `epoch` (call before iterating, on every rank with the same value)."""
        self.epoch = epoch

    def __len__(self):
        return len(self.lengths) // self.global_batch

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(self.lengths), generator=generator).tolist()
        else:
            order = list(range(len(self.lengths)))
        for step in range(len(self)):
            batch = order[step * self.global_batch:(step + 1) * self.global_batch]
            groups = balanced_split([self.lengths[i] for i in batch], self.num_replicas)
            yield [batch[position] for position in groups[self.rank]]
