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
