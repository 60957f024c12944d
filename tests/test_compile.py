"""torch.compile of code calling fastdpo.loss: the LM head and the row work are torch.library custom ops (opaque,
with fake implementations), so the graph breaks are only the documented host syncs (label validation, the
finite check) and none with static_shapes=True. Counted with torch._dynamo.explain on CPU (no compilation)."""
import torch
import torch._dynamo

import fastdpo


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(4, 8, 16, generator=g, requires_grad=True)
    weight = torch.randn(50, 16, generator=g, requires_grad=True)
    labels = torch.randint(0, 50, (4, 8), generator=g)
    labels[:, :3] = -100
    return hidden, weight, labels, torch.randn(4, generator=g)


def _step(hidden, weight, labels, ref_logps, **options):
    out = fastdpo.loss(hidden=hidden, weight=weight, labels=labels, ref_logps=ref_logps, **options)
    return out.loss, out.chosen_logps


def test_a_loss_call_breaks_the_graph_only_at_its_two_host_syncs():
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(_step)(*_batch())
    assert explanation.graph_break_count <= 2, [str(b.reason)[:200] for b in explanation.break_reasons]


def test_compiled_loss_matches_eager_bitwise():
    torch._dynamo.reset()
    hidden, weight, labels, ref_logps = _batch(1)
    eager = _step(hidden, weight, labels, ref_logps)
    eager_grads = torch.autograd.grad(eager[0], (hidden, weight))
    compiled = torch.compile(_step, backend="aot_eager")(hidden, weight, labels, ref_logps)
    compiled_grads = torch.autograd.grad(compiled[0], (hidden, weight))
    assert all(torch.equal(a, b) for a, b in zip(eager + eager_grads, compiled + compiled_grads))


def test_max_scored_tokens_runs_without_host_sync_or_graph_break():
    """max_scored_tokens: device-side checks, a fixed number of head rows: a loop of steps is one graph."""
    hidden, weight, labels, ref_logps = _batch(2)
    n_scored = int((labels[:, 1:] != -100).sum())

    def steps(hidden, weight, labels, ref_logps):
        return [_step(hidden, weight, labels, ref_logps, max_scored_tokens=n_scored + 5) for _ in range(3)]

    torch._dynamo.reset()
    explanation = torch._dynamo.explain(steps)(hidden, weight, labels, ref_logps)
    assert explanation.graph_break_count == 0, [str(b.reason)[:200] for b in explanation.break_reasons]
    padded, plain = steps(hidden, weight, labels, ref_logps)[0], _step(hidden, weight, labels, ref_logps)
    for a, b in zip(padded, plain):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)
    grads = torch.autograd.grad(padded[0], (hidden, weight)), torch.autograd.grad(plain[0], (hidden, weight))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
