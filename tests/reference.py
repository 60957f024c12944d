"""Float64 reference implementations the tests compare against (independent of fastdpo's code paths)."""
import torch


def sequence_logps_f64(logits, labels, seq_ids=None, *, ignore_index=-100, shift=True, num_sequences=None):
    """Per-sequence sums of log_softmax(logits)[label] in float64, token by token.

    logits [R, T, V] (any float dtype, upcast), labels [R, T], seq_ids [R, T] or None.
    Returns (logps [S] float64, n_tokens [S] int64); differentiable w.r.t. logits.
    """
    R, T, _ = logits.shape
    if seq_ids is None:
        seq_ids = torch.arange(R)[:, None].expand(R, T)
    S = num_sequences if num_sequences is not None else int(seq_ids.max()) + 1
    logp = torch.log_softmax(logits.double(), dim=-1)
    totals = [logits.new_zeros((), dtype=torch.float64) for _ in range(S)]
    counts = [0] * S
    for r in range(R):
        for t in range(T):
            src, tgt = (t, t + 1) if shift else (t, t)
            if tgt >= T:
                continue
            label, seq = int(labels[r, tgt]), int(seq_ids[r, tgt])
            if label == ignore_index or seq < 0:
                continue
            totals[seq] = totals[seq] + logp[r, src, label]
            counts[seq] += 1
    return torch.stack(totals), torch.tensor(counts)


def head_logits_f64(hidden, weight, bias=None, *, logit_scale=1.0, softcap=None, temperature=1.0):
    """z = softcap(logit_scale * (hidden @ weight.T + bias)) / temperature in float64."""
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    return transformed_f64(z, logit_scale=logit_scale, softcap=softcap, temperature=temperature)


def transformed_f64(x, *, logit_scale=1.0, softcap=None, temperature=1.0):
    """z = softcap(logit_scale * x) / temperature in float64 (the logit transforms of raw logits x)."""
    z = x.double() * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def rel_err(actual, expected):
    """max |actual - expected| / max |expected| (a norm-relative error, robust to near-zero entries)."""
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30)).item()


def random_labels(R, T, V, *, prompt_len=2, ignore_frac=0.2, seed=0):
    """Random labels [R, T] with an ignored prompt prefix and scattered ignored tokens (never all zeros)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (R, T), generator=g)
    labels[:, :prompt_len] = -100
    labels[torch.rand(R, T, generator=g) < ignore_frac] = -100
    return labels


def varlen_attention_f64(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, scale=None,
                         window=(-1, 0), softcap=None, dropout=0.0):
    """flash-attn's flash_attn_varlen_func(..., causal=True) written out segment by segment: q [Nq, Hq, D],
    k / v [Nk, Hkv, D] (Hq a multiple of Hkv), causal aligned to the bottom right, window (left, right) in
    tokens (-1: none), scores softcap * tanh(s / softcap). Computes in the inputs' dtype (float64 for a
    reference); returns [Nq, Hq, D]."""
    assert dropout == 0.0 and window[1] in (0, -1)
    cu_q, cu_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    assert cu_q[0] == cu_k[0] == 0 and cu_q[-1] == q.shape[0] and cu_k[-1] == k.shape[0] and len(cu_q) == len(cu_k)
    assert max(b - a for a, b in zip(cu_q, cu_q[1:])) == max_seqlen_q
    assert max(b - a for a, b in zip(cu_k, cu_k[1:])) == max_seqlen_k
    rep = q.shape[1] // k.shape[1]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = []
    for (q0, q1), (k0, k1) in zip(zip(cu_q, cu_q[1:]), zip(cu_k, cu_k[1:])):
        qs = q[q0:q1].transpose(0, 1)  # [H, lq, D]
        ks = k[k0:k1].repeat_interleave(rep, dim=1).transpose(0, 1)
        vs = v[k0:k1].repeat_interleave(rep, dim=1).transpose(0, 1)
        s = qs @ ks.transpose(-1, -2) * scale
        if softcap is not None:
            s = softcap * torch.tanh(s / softcap)
        i = torch.arange(q1 - q0)[:, None] + (k1 - k0) - (q1 - q0)  # bottom-right: query i is key i + lk - lq
        j = torch.arange(k1 - k0)[None, :]
        allowed = (j <= i) & ((j >= i - window[0]) if window[0] >= 0 else True)
        out.append((s.masked_fill(~allowed, float("-inf")).softmax(-1) @ vs).transpose(0, 1))
    return torch.cat(out)
