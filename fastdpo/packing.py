"""Packing preference pairs into padding-free rows.

Two layouts, chosen with ``pack_pairs(..., shared_prompt=...)``:

* ``shared_prompt=False`` ("packed"): every pair contributes two independent sequences,
  ``[prompt][chosen]`` and ``[prompt][rejected]``, placed next to each other in one row. Each sequence
  attends causally to itself only and its positions restart at 0.

* ``shared_prompt=True`` ("shared"): one copy of the prompt per pair::

      [p_0 .. p_{P-1}] [c_0 .. c_{C-1}] [p_{P-1}'] [r_0 .. r_{R-1}]
       positions 0..P-1   P..P+C-1        P-1       P..P+R-1

  The chosen block attends to the whole prompt and causally to itself. The rejected block (which starts
  with ``p_{P-1}'``, a repeat of the last prompt token) attends to ``p_0 .. p_{P-2}`` and causally to
  itself, never to the chosen response *and not to the original* ``p_{P-1}``: ``p_{P-1}'`` stands in for
  it at the same position, so every rejected token sees exactly the keys/values it would see in an
  unpacked ``[prompt][rejected]`` run (attending to both copies would count that key twice). The repeat
  is needed because a position carries one label: the hidden state at ``p_{P-1}`` predicts ``c_0``, the
  one at ``p_{P-1}'`` predicts ``r_0``.

Input rows: ``pack_pairs`` takes three lists of token ids; ``pack_rows`` and ``PairCollator`` (a DataLoader
``collate_fn``) take tokenized preference rows as TRL 1.16's DPOTrainer makes them (``prompt_ids``,
``chosen_ids``, ``rejected_ids``; chosen / rejected without the prompt), TRL < 1.0's ``prompt_input_ids`` /
``chosen_input_ids`` / ``rejected_input_ids``, ``(prompt, chosen, rejected)`` tuples, or a
``datasets.Dataset`` with those columns.

Whole pairs are placed into rows of at most ``max_tokens`` tokens by first-fit-decreasing bin packing (by
default one row: attention costs the sum over segments, ``fastdpo.attention``). ``group_prompts=True`` lets
pairs with one prompt share it: ``[prompt[:-1]] [p c_1] [p r_1] [p c_2] [p r_2] ...``.
Labels follow the Hugging Face unshifted convention (``-100`` on prompt, the repeated token and padding)
and ``seq_ids`` follow the TRL numbering (chosen of pair i -> i, rejected -> B + i, -1 elsewhere), so
``fastdpo.sequence_logps(..., shift=True)`` / ``fastdpo.loss`` score every response token from the
right context.

The attention masks and flash-attn arguments of a packed batch live in ``fastdpo.attention``.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .validate import check_bool, check_choice, check_int, require

__all__ = [
    "TRUNCATION_POLICIES",
    "PackingWarning",
    "TruncationEvent",
    "PackingReport",
    "PackedBatch",
    "pack_pairs",
    "pack_rows",
    "PairCollator",
    "PAIR_FIELDS",
    "pair_parts",
    "rows_to_pairs",
    "pair_length",
    "first_fit_decreasing",
    "balanced_bins",
    "layout_token_counts",
    "DATASET_SHAPES",
    "synthetic_lengths",
]

TRUNCATION_POLICIES = ("error", "keep_end_of_prompt", "truncate_response")
PAIR_FIELDS = (  # column names of tokenized preference rows, in order of preference
    ("prompt_ids", "chosen_ids", "rejected_ids"),  # TRL >= 1.0 (DPOTrainer's tokenize step)
    ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),  # TRL < 1.0
)

# branch ids: which part of a pair block a token belongs to (see fastdpo.attention.make_mask_mod)
BRANCH_PAD = -1
BRANCH_CONTEXT = 0  # visible to every later token of its block (prompt[:-1] in the shared layout)
BRANCH_CHOSEN = 1  # last prompt token + chosen response (shared layout); whole sequence otherwise
BRANCH_REJECTED = 2  # repeated last prompt token + rejected response (shared layout)
# grouped prompts: pair j of a group has branches BRANCH_CHOSEN + 2j and BRANCH_REJECTED + 2j


class PackingWarning(UserWarning):
    """Emitted whenever packing changed the data (truncation)."""


@dataclass(frozen=True)
class TruncationEvent:
    pair_index: int
    policy: str
    before: tuple[int, int, int]  # (prompt, chosen, rejected) lengths
    after: tuple[int, int, int]

    def __str__(self) -> str:
        return f"pair {self.pair_index}: (prompt, chosen, rejected) {self.before} -> {self.after} [{self.policy}]"


@dataclass
class PackingReport:
    num_pairs: int
    num_rows: int
    row_length: int
    max_tokens: int
    shared_prompt: bool
    real_tokens: int  # non-padding tokens
    truncated: list[TruncationEvent] = field(default_factory=list)
    prompt_tokens_saved: int = 0  # group_prompts: prompt tokens not repeated, against one prompt copy per pair

    @property
    def total_tokens(self) -> int:
        return self.num_rows * self.row_length

    @property
    def padding_tokens(self) -> int:
        return self.total_tokens - self.real_tokens

    @property
    def fill(self) -> float:
        return self.real_tokens / max(self.total_tokens, 1)

    def __str__(self) -> str:
        s = (
            f"packed {self.num_pairs} pairs ({'shared' if self.shared_prompt else 'separate'} prompt) into "
            f"{self.num_rows} rows x {self.row_length} tokens (max_tokens={self.max_tokens}), "
            f"{self.real_tokens} real tokens, fill {self.fill:.1%}"
        )
        if self.prompt_tokens_saved:
            s += f"; {self.prompt_tokens_saved} prompt tokens saved by grouping pairs with one prompt"
        if self.truncated:
            s += f"; {len(self.truncated)} pairs truncated: " + "; ".join(map(str, self.truncated[:5]))
            if len(self.truncated) > 5:
                s += "; ..."
        return s


@dataclass
class PackedBatch:
    """Packed preference pairs. All [R, T] tensors share one layout; see the module docstring."""

    input_ids: torch.Tensor  # [R, T] int64
    position_ids: torch.Tensor  # [R, T] int64, restarting per sequence (continuing for shared responses)
    labels: torch.Tensor  # [R, T] int64, unshifted, ignore_index on prompt / repeated token / padding
    seq_ids: torch.Tensor  # [R, T] int64, aligned with labels: chosen of pair i -> i, rejected -> B+i, else -1
    segment_ids: torch.Tensor  # [R, T] int64, attention segment per token (global counter), -1 padding
    branch_ids: torch.Tensor  # [R, T] int64, BRANCH_* (see make_mask_mod)
    cu_seqlens: torch.Tensor  # [N+1] int32, boundaries of attention segments over the flattened R*T tokens
    max_seqlen: int  # longest attention segment (incl. padding segments)
    num_pairs: int
    shared_prompt: bool
    pair_rows: list[int]  # row holding each pair
    report: PackingReport
    ignore_index: int = -100

    @property
    def num_sequences(self) -> int:
        return 2 * self.num_pairs

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.input_ids.shape)

    def to(self, device) -> "PackedBatch":
        out = PackedBatch(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        for k in ("input_ids", "position_ids", "labels", "seq_ids", "segment_ids", "branch_ids", "cu_seqlens"):
            setattr(out, k, getattr(out, k).to(device))
        return out


# --------------------------------------------------------------------------------------------------
# validation / truncation
# --------------------------------------------------------------------------------------------------

def pair_length(prompt_len: int, chosen_len: int, rejected_len: int, shared_prompt: bool) -> int:
    """Tokens a pair occupies in a row."""
    if shared_prompt:
        return prompt_len + chosen_len + 1 + rejected_len
    return 2 * prompt_len + chosen_len + rejected_len


def _as_token_list(x, what: str, i: int, vocab_size: int | None) -> list[int]:
    if isinstance(x, torch.Tensor):
        if x.dim() != 1:
            raise ValueError(f"{what}[{i}] must be a 1-D sequence of token ids, got shape {tuple(x.shape)}")
        if x.dtype.is_floating_point or x.dtype == torch.bool:
            raise ValueError(f"{what}[{i}] must hold integer token ids, got dtype {x.dtype}")
        x = x.tolist()
    elif isinstance(x, (str, bytes)):
        raise ValueError(f"{what}[{i}] is a string: pack_pairs takes token ids (tokenize first)")
    try:
        toks = list(x)
    except TypeError:
        raise ValueError(f"{what}[{i}] must be a sequence of token ids, got {type(x).__name__}") from None
    if len(toks) == 0:
        raise ValueError(f"{what}[{i}] is empty: every prompt and response needs at least one token")
    for t in toks:
        if isinstance(t, bool) or not isinstance(t, int):
            if not isinstance(t, np.integer):
                raise ValueError(f"{what}[{i}] contains a non-integer token id {t!r}")
    toks = [int(t) for t in toks]
    lo, hi = min(toks), max(toks)
    if lo < 0:
        raise ValueError(f"{what}[{i}] contains a negative token id {lo}")
    if hi > torch.iinfo(torch.int64).max:
        raise ValueError(f"{what}[{i}] contains token id {hi}, beyond the int64 range of token ids (< 2**63)")
    if vocab_size is not None and hi >= vocab_size:
        raise ValueError(f"{what}[{i}] contains token id {hi} outside the vocabulary (vocab_size={vocab_size})")
    return toks


def _truncate(p, c, r, i, max_tokens, shared, policy):
    """Return (p, c, r, event|None) fitting max_tokens under `policy`, or raise ValueError."""
    P, C, R = len(p), len(c), len(r)
    n = pair_length(P, C, R, shared)
    if max_tokens is None or n <= max_tokens:
        return p, c, r, None
    layout = "shared-prompt" if shared else "separate-prompt"
    detail = f"pair {i} needs {n} tokens ({layout} layout: prompt {P}, chosen {C}, rejected {R}) > max_tokens={max_tokens}"
    if policy == "error":
        raise ValueError(
            f"{detail}; raise max_tokens or pass truncation='keep_end_of_prompt' or 'truncate_response'"
        )
    if policy == "keep_end_of_prompt":
        excess = n - max_tokens
        drop = excess if shared else -(-excess // 2)
        if P - drop < 1:
            raise ValueError(f"{detail}; truncation='keep_end_of_prompt' cannot fit it even with a 1-token prompt")
        p2, c2, r2 = p[drop:], c, r
    elif policy == "truncate_response":
        avail = max_tokens - (P + 1 if shared else 2 * P)
        if avail < 2:
            raise ValueError(f"{detail}; truncation='truncate_response' cannot fit it even with 1-token responses")
        short = min(C, R)
        if 2 * short <= avail:  # the shorter response is kept whole, the longer one is cut
            cap = avail - short
        else:  # both are cut to (about) half the budget
            cap = avail // 2
        C2, R2 = min(C, cap), min(R, cap)
        spare = avail - C2 - R2  # odd budget: one more token to whichever response can take it
        if spare and C2 < C:
            C2 += 1
        elif spare and R2 < R:
            R2 += 1
        p2, c2, r2 = p, c[:C2], r[:R2]
    else:  # pragma: no cover - checked by the caller
        raise AssertionError(policy)
    ev = TruncationEvent(i, policy, (P, C, R), (len(p2), len(c2), len(r2)))
    assert pair_length(len(p2), len(c2), len(r2), shared) <= max_tokens
    return p2, c2, r2, ev


def check_pack_options(*, max_tokens, shared_prompt, truncation, pad_token_id, pad_to_multiple_of, ignore_index,
                       vocab_size, group_prompts=False):
    """The options of pack_pairs (TypeError / ValueError naming the option)."""
    check_int("max_tokens", max_tokens, minimum=4, optional=True)
    check_bool("shared_prompt", shared_prompt)
    check_bool("group_prompts", group_prompts)
    require(shared_prompt or not group_prompts, "group_prompts=True needs shared_prompt=True (one prompt copy per "
                                                "group); the separate layout repeats the prompt per sequence")
    check_choice("truncation", truncation, TRUNCATION_POLICIES)
    check_int("pad_to_multiple_of", pad_to_multiple_of, minimum=1, optional=True)
    check_int("vocab_size", vocab_size, minimum=1, optional=True)
    check_int("pad_token_id", pad_token_id, minimum=0)
    require(vocab_size is None or pad_token_id < vocab_size,
            f"pad_token_id={pad_token_id} is outside the vocabulary (vocab_size={vocab_size})")
    check_int("ignore_index", ignore_index)
    require(ignore_index < 0, f"ignore_index must be negative (token ids are >= 0, so a label equal to a "
                              f"non-negative ignore_index would silently drop that token from scoring), "
                              f"got {ignore_index}")


def first_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Bin packing: items (indices into `lengths`) sorted by decreasing length, each placed into the first
    bin with room. Returns bins as lists of item indices in placement order. Ties keep input order."""
    order = sorted(range(len(lengths)), key=lambda k: (-lengths[k], k))
    bins: list[list[int]] = []
    room: list[int] = []
    for k in order:
        n = lengths[k]
        if n > capacity:
            raise ValueError(f"item {k} of length {n} exceeds the bin capacity {capacity}")
        for b in range(len(bins)):
            if room[b] >= n:
                bins[b].append(k)
                room[b] -= n
                break
        else:
            bins.append([k])
            room.append(capacity - n)
    return bins


def balanced_bins(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """As many bins as first-fit-decreasing needs at `capacity`, filled as evenly as possible: the
    smallest capacity (from max(longest item, mean fill) up) at which FFD still needs no more bins.
    Rows are padded to the fullest bin, so even bins mean less padding than plain FFD."""
    bins = first_fit_decreasing(lengths, capacity)
    lower = max(max(lengths), -(-sum(lengths) // len(bins)))
    for tighter in range(lower, capacity):
        candidate = first_fit_decreasing(lengths, tighter)
        if len(candidate) == len(bins):
            return candidate
    return bins


# --------------------------------------------------------------------------------------------------
# packing
# --------------------------------------------------------------------------------------------------

def pack_pairs(
    prompts: Sequence[Sequence[int]],
    chosen: Sequence[Sequence[int]],
    rejected: Sequence[Sequence[int]],
    *,
    max_tokens: int | None = None,
    shared_prompt: bool = True,
    group_prompts: bool = False,
    truncation: str = "error",
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    ignore_index: int = -100,
    vocab_size: int | None = None,
    device: torch.device | str | None = None,
) -> PackedBatch:
    """Pack B preference pairs (token-id lists) into rows of at most ``max_tokens`` tokens.

    ``max_tokens=None`` (default): one row holding every pair, no padding at all (attention costs the sum over
    segments, not the square of the row: ``fastdpo.attention``; only eager attention, the dense reference,
    pays rows x T^2). ``group_prompts=True`` (shared layout): pairs with an identical prompt share one block
    ``[prompt[:-1]] [p c_1] [p r_1] [p c_2] [p r_2] ...`` (p: the last prompt token, repeated per response),
    each response attending to the prompt and itself; ``report.prompt_tokens_saved`` counts the tokens saved.
    Returns a :class:`PackedBatch`; ``batch.report`` says how the pairs were packed and which were truncated
    (truncation also emits a :class:`PackingWarning`). Row length T is the longest row, rounded up to
    ``pad_to_multiple_of``. Pairs (and prompt groups) are never split across rows. ``ignore_index`` (the label of
    positions with no target) must be negative, so that it can never equal a token id.
    """
    check_pack_options(max_tokens=max_tokens, shared_prompt=shared_prompt, truncation=truncation,
                       pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of, ignore_index=ignore_index,
                       vocab_size=vocab_size, group_prompts=group_prompts)
    if not (len(prompts) == len(chosen) == len(rejected)):
        raise ValueError(
            f"prompts, chosen and rejected must have the same length, got {len(prompts)}, {len(chosen)}, {len(rejected)}"
        )
    B = len(prompts)
    if B == 0:
        raise ValueError("pack_pairs needs at least one preference pair")

    pairs, events = [], []
    for i in range(B):
        p = _as_token_list(prompts[i], "prompts", i, vocab_size)
        c = _as_token_list(chosen[i], "chosen", i, vocab_size)
        r = _as_token_list(rejected[i], "rejected", i, vocab_size)
        p, c, r, ev = _truncate(p, c, r, i, max_tokens, shared_prompt, truncation)
        if ev is not None:
            events.append(ev)
        pairs.append((p, c, r))
    if events:
        warnings.warn(
            f"pack_pairs truncated {len(events)} of {B} pairs to max_tokens={max_tokens} "
            f"(truncation={truncation!r}): " + "; ".join(map(str, events[:3])) + ("; ..." if len(events) > 3 else ""),
            PackingWarning,
            stacklevel=2,
        )

    if group_prompts:  # pairs with one prompt (after truncation) share one block
        by_prompt: dict[tuple, list[int]] = {}
        for k, (p, _, _) in enumerate(pairs):
            by_prompt.setdefault(tuple(p), []).append(k)
        items = list(by_prompt.values())
    else:
        items = [[k] for k in range(B)]
    lengths = [pair_length(len(p), len(c), len(r), shared_prompt) for p, c, r in pairs]
    # a group of n pairs holds its prompt context (P - 1 tokens) once instead of n times
    item_lengths = [sum(lengths[k] for k in item) - (len(item) - 1) * (len(pairs[item[0]][0]) - 1) for item in items]
    budget = sum(item_lengths) if max_tokens is None else max_tokens
    if max(item_lengths) > budget:
        k = item_lengths.index(max(item_lengths))
        raise ValueError(f"the {len(items[k])} pairs of prompt group {k} need {item_lengths[k]} tokens > "
                         f"max_tokens={max_tokens}; raise max_tokens or pass group_prompts=False")
    bins = balanced_bins(item_lengths, budget)  # rows of item indices
    R_ = len(bins)
    T = max(sum(item_lengths[i] for i in b) for b in bins)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of

    ids = [[pad_token_id] * T for _ in range(R_)]
    pos = [[0] * T for _ in range(R_)]
    lab = [[ignore_index] * T for _ in range(R_)]
    sid = [[-1] * T for _ in range(R_)]
    seg = [[-1] * T for _ in range(R_)]
    br = [[BRANCH_PAD] * T for _ in range(R_)]
    seg_lens: list[int] = []
    pair_rows = [0] * B
    n_seg = 0

    def put(row, t, toks, positions, labels, seq, segment, branch):
        n = len(toks)
        ids[row][t:t + n] = toks
        pos[row][t:t + n] = positions
        lab[row][t:t + n] = labels
        sid[row][t:t + n] = [seq if l != ignore_index else -1 for l in labels]
        seg[row][t:t + n] = [segment] * n
        br[row][t:t + n] = [branch] * n
        return t + n

    for row, b in enumerate(bins):
        t = 0
        for item in (items[i] for i in b):
            start = t
            p = pairs[item[0]][0]
            P = len(p)
            if shared_prompt:  # [prompt[:-1]] then, per pair j, [last prompt token + chosen][its copy + rejected]
                t = put(row, t, p[:-1], list(range(P - 1)), [ignore_index] * (P - 1), -1, n_seg, BRANCH_CONTEXT)
                for j, k in enumerate(item):
                    pair_rows[k] = row
                    for resp, s, branch in ((pairs[k][1], k, BRANCH_CHOSEN), (pairs[k][2], B + k, BRANCH_REJECTED)):
                        t = put(row, t, [p[-1]] + resp, list(range(P - 1, P + len(resp))),
                                [ignore_index] + resp, s, n_seg, branch + 2 * j)
                seg_lens.append(t - start)
                n_seg += 1
            else:
                (k,) = item
                pair_rows[k] = row
                for resp, s in ((pairs[k][1], k), (pairs[k][2], B + k)):
                    t = put(row, t, p + resp, list(range(P + len(resp))),
                            [ignore_index] * P + resp, s, n_seg, BRANCH_CHOSEN)
                    seg_lens.append(P + len(resp))
                    n_seg += 1
        if t < T:  # padding: own segment (attends to itself only); positions 0.. so that position-id based
            # segment detection (HF flash-attn / packed-sequence masks) sees it as a separate sequence
            pos[row][t:T] = list(range(T - t))
            seg_lens.append(T - t)

    kw = dict(dtype=torch.long, device=device)
    cu = torch.tensor([0] + seg_lens, dtype=torch.int64, device="cpu").cumsum(0).to(torch.int32)
    assert int(cu[-1]) == R_ * T
    batch = PackedBatch(
        input_ids=torch.tensor(ids, **kw),
        position_ids=torch.tensor(pos, **kw),
        labels=torch.tensor(lab, **kw),
        seq_ids=torch.tensor(sid, **kw),
        segment_ids=torch.tensor(seg, **kw),
        branch_ids=torch.tensor(br, **kw),
        cu_seqlens=cu.to(device) if device is not None else cu,
        max_seqlen=max(seg_lens),
        num_pairs=B,
        shared_prompt=shared_prompt,
        pair_rows=pair_rows,
        report=PackingReport(
            num_pairs=B, num_rows=R_, row_length=T, max_tokens=budget, shared_prompt=shared_prompt,
            real_tokens=sum(item_lengths), truncated=events, prompt_tokens_saved=sum(lengths) - sum(item_lengths),
        ),
        ignore_index=ignore_index,
    )
    return batch


# --------------------------------------------------------------------------------------------------
# token accounting
# --------------------------------------------------------------------------------------------------

# Rough mean token lengths (prompt, response) with the prompt:response ratios of common DPO datasets.
DATASET_SHAPES = {
    "hh-rlhf": (150, 70),  # ratio ~2.15
    "tldr": (330, 30),  # ratio 11
    "ultrafeedback": (168, 400),  # ratio 0.42
}


def synthetic_lengths(prompt_mean: float, response_mean: float, n: int, *, sigma: float = 0.0, seed: int = 0):
    """n (prompt, chosen, rejected) length triples; log-normal spread `sigma` (0 -> all equal to the means).
    Chosen and rejected are drawn independently."""
    g = torch.Generator().manual_seed(seed)

    def draw(mean):
        if sigma == 0:
            return [max(1, round(mean))] * n
        mu = math.log(mean) - sigma ** 2 / 2  # keep the mean
        x = torch.exp(mu + sigma * torch.randn(n, generator=g, dtype=torch.float64))
        return [max(1, round(v)) for v in x.tolist()]

    return draw(prompt_mean), draw(response_mean), draw(response_mean)


def layout_token_counts(
    prompt_lens: Sequence[int],
    chosen_lens: Sequence[int],
    rejected_lens: Sequence[int],
    *,
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> dict:
    """Tokens processed per pair under three layouts.

    * "padded": TRL-style, 2 rows per pair ([prompt][chosen], [prompt][rejected]) padded to the longest
      sequence of its mini-batch of `batch_size` pairs;
    * "packed": separate-prompt packing, 2P + C + R per pair;
    * "shared": shared-prompt packing, P + C + 1 + R per pair.
    With `max_tokens`, "packed"/"shared" additionally include the padding left by first-fit-decreasing
    rows (rows * row_length per pair, each mini-batch packed on its own). Also reports the attention
    score entries per pair (sum over causal segments of n(n+1)/2, plus the shared layout's extra
    prompt-to-rejected block) as "*_attn".
    """
    P, C, R = list(prompt_lens), list(chosen_lens), list(rejected_lens)
    if not (len(P) == len(C) == len(R)) or not P:
        raise ValueError("prompt_lens, chosen_lens, rejected_lens must be non-empty and of equal length")
    n = len(P)
    padded = 0
    packed = 0
    shared = 0
    tri = lambda k: k * (k + 1) // 2  # noqa: E731
    attn = {"padded": 0, "packed": 0, "shared": 0}
    for s in range(0, n, batch_size):
        idx = range(s, min(s + batch_size, n))
        L = max(max(P[i] + C[i], P[i] + R[i]) for i in idx)
        padded += 2 * L * len(idx)
        attn["padded"] += 2 * tri(L) * len(idx)
        lp = [pair_length(P[i], C[i], R[i], False) for i in idx]
        ls = [pair_length(P[i], C[i], R[i], True) for i in idx]
        if max_tokens is None:
            packed += sum(lp)
            shared += sum(ls)
        else:
            for lens, name in ((lp, "packed"), (ls, "shared")):
                if max(lens) > max_tokens:
                    raise ValueError(f"a pair needs {max(lens)} tokens > max_tokens={max_tokens} ({name} layout)")
                bins = balanced_bins(lens, max_tokens)
                rows_t = len(bins) * max(sum(lens[k] for k in b) for b in bins)
                if name == "packed":
                    packed += rows_t
                else:
                    shared += rows_t
        for i in idx:
            attn["packed"] += tri(P[i] + C[i]) + tri(P[i] + R[i])
            attn["shared"] += tri(P[i] + C[i]) + (P[i] - 1) * (R[i] + 1) + tri(R[i] + 1)
    real = sum(P) + sum(C) + sum(R)
    out = {
        "pairs": n,
        "mean_prompt": sum(P) / n,
        "mean_response": (sum(C) + sum(R)) / (2 * n),
        "padded": padded / n,
        "packed": packed / n,
        "shared": shared / n,
        "padded_attn": attn["padded"] / n,
        "packed_attn": attn["packed"] / n,
        "shared_attn": attn["shared"] / n,
        "unique_tokens": real / n,
    }
    out["shared_vs_packed"] = out["shared"] / out["packed"]
    out["shared_vs_padded"] = out["shared"] / out["padded"]
    out["packed_vs_padded"] = out["packed"] / out["padded"]
    return out


# --------------------------------------------------------------------------------------------------
# tokenized preference rows (TRL datasets) -> packed batches
# --------------------------------------------------------------------------------------------------

def pair_parts(row: object) -> tuple:
    """(prompt, chosen, rejected) token ids of one row: a mapping with the keys of one of PAIR_FIELDS, or a
    (prompt, chosen, rejected) tuple/list."""
    if isinstance(row, dict) or hasattr(row, "keys"):
        for fields in PAIR_FIELDS:
            if all(k in row for k in fields):
                return tuple(row[k] for k in fields)
        raise ValueError(f"a preference row mapping needs the keys {PAIR_FIELDS[0]} (TRL >= 1.0) or "
                         f"{PAIR_FIELDS[1]} (TRL < 1.0), got keys {sorted(row.keys())}")
    if isinstance(row, (tuple, list)) and len(row) == 3:
        return tuple(row)
    raise TypeError(f"a preference row is a mapping with keys {PAIR_FIELDS[0]} or a (prompt, chosen, rejected) "
                    f"tuple, got {type(row).__name__}")


def rows_to_pairs(rows: object) -> tuple:
    """(prompts, chosen, rejected) lists from tokenized preference rows: a ``datasets.Dataset`` (its columns are
    read directly) or a sequence of rows as :func:`pair_parts` takes them."""
    columns = getattr(rows, "column_names", None)
    if columns is not None:
        for fields in PAIR_FIELDS:
            if set(fields) <= set(columns):
                return tuple(list(rows[k]) for k in fields)
        raise ValueError(f"a dataset of preference rows needs the columns {PAIR_FIELDS[0]} (TRL >= 1.0) or "
                         f"{PAIR_FIELDS[1]} (TRL < 1.0), got {columns}")
    if isinstance(rows, (str, bytes, dict)) or not isinstance(rows, Sequence):
        raise TypeError(f"rows must be a datasets.Dataset or a sequence of preference rows, got {type(rows).__name__}")
    parts = [pair_parts(row) for row in rows]
    return tuple(list(column) for column in zip(*parts)) if parts else ([], [], [])


def pack_rows(rows: object, **pack_kwargs) -> PackedBatch:
    """:func:`pack_pairs` on tokenized preference rows (TRL 1.16 ``prompt_ids`` / ``chosen_ids`` /
    ``rejected_ids`` mappings, older TRL names, tuples, or a ``datasets.Dataset``)."""
    return pack_pairs(*rows_to_pairs(rows), **pack_kwargs)


class PairCollator:
    """``collate_fn`` for a plain PyTorch loop: a list of tokenized preference rows -> :class:`PackedBatch`.

        loader = DataLoader(dataset, batch_size=8, collate_fn=PairCollator(max_tokens=4096))
        for batch in loader:
            out = fastdpo.model_loss(policy, batch, ref_model=reference)

    The options are those of :func:`pack_pairs` (checked here, once); rows as :func:`pack_rows` takes them.
    """

    def __init__(self, *, max_tokens: int | None = None, shared_prompt: bool = True, group_prompts: bool = False,
                 truncation: str = "error", pad_token_id: int = 0, pad_to_multiple_of: int | None = None,
                 ignore_index: int = -100, vocab_size: int | None = None):
        self.options = dict(max_tokens=max_tokens, shared_prompt=shared_prompt, group_prompts=group_prompts,
                            truncation=truncation, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                            ignore_index=ignore_index, vocab_size=vocab_size)
        check_pack_options(**self.options)

    def __call__(self, rows: Sequence[object]) -> PackedBatch:
        return pack_rows(rows, **self.options)
