"""fastdpo.loss: the DPO step against a float64 TRL-style computation, reference paths, metrics, bad input."""
import math

import pytest
import torch

import fastdpo
from reference import random_labels, rel_err, sequence_logps_f64

B, T, V, D = 2, 8, 60, 12


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * B, T, D, generator=g)
    ref_hidden = hidden + 0.3 * torch.randn(2 * B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) / D ** 0.5 * 2
    labels = random_labels(2 * B, T, V, prompt_len=3, seed=seed)
    return hidden, ref_hidden, weight, labels


def _dpo_sigmoid_f64(policy_logits, ref_logits, labels, beta):
    """TRL's sigmoid DPO loss in float64 from full logits: -mean log sigmoid(beta * margin)."""
    logps, _ = sequence_logps_f64(policy_logits, labels)
    ref, _ = sequence_logps_f64(ref_logits, labels)
    margin = (logps[:B] - ref[:B]) - (logps[B:] - ref[B:])
    return -torch.nn.functional.logsigmoid(beta * margin).mean()


@pytest.mark.parametrize("form", ["logits", "fused"])
def test_sigmoid_loss_and_gradients_match_float64(form):
    hidden, ref_hidden, weight, labels = _batch()
    hidden.requires_grad_()
    weight.requires_grad_()
    if form == "logits":
        out = fastdpo.loss(hidden @ weight.T, labels, ref_logits=ref_hidden @ weight.T, beta=0.3)
    else:
        out = fastdpo.loss(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels, beta=0.3)
    grads = torch.autograd.grad(out.loss, (hidden, weight))

    h, w = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    expected = _dpo_sigmoid_f64(h @ w.T, ref_hidden.double() @ w.detach().T, labels, 0.3)
    expected_grads = torch.autograd.grad(expected, (h, w))
    assert rel_err(out.loss, expected) <= 1e-5
    for g, e in zip(grads, expected_grads):
        assert rel_err(g, e) <= 1e-5


def test_policy_equal_to_reference_gives_ln2():
    hidden, _, weight, labels = _batch(1)
    logits = hidden @ weight.T
    out = fastdpo.loss(logits, labels, ref_logits=logits.clone())
    assert abs(out.loss.item() - math.log(2)) < 1e-6
    assert torch.all(out.chosen_rewards == 0) and torch.all(out.rejected_rewards == 0)


def test_reference_inputs_agree_and_get_no_gradient():
    hidden, ref_hidden, weight, labels = _batch(2)
    ref_logits = (ref_hidden @ weight.T).requires_grad_()
    ref_logps = fastdpo.sequence_logps(hidden=ref_hidden, weight=weight, labels=labels).logps
    results = [
        fastdpo.loss(hidden=hidden, weight=weight, labels=labels, ref_logits=ref_logits),
        fastdpo.loss(hidden=hidden, weight=weight, labels=labels, ref_hidden=ref_hidden),
        fastdpo.loss(hidden=hidden, weight=weight, labels=labels, ref_hidden=ref_hidden, ref_weight=weight),
        fastdpo.loss(hidden=hidden, weight=weight, labels=labels, ref_logps=ref_logps),
    ]
    for out in results[1:]:
        assert rel_err(out.loss, results[0].loss) <= 1e-6
        assert rel_err(out.ref_chosen_logps, results[0].ref_chosen_logps) <= 1e-6
    assert not results[0].ref_chosen_logps.requires_grad


def test_metrics_follow_trl_definitions():
    hidden, ref_hidden, weight, labels = _batch(3)
    logits, ref_logits = hidden @ weight.T, ref_hidden @ weight.T
    out = fastdpo.loss(logits, labels, ref_logits=ref_logits, beta=0.5)
    logps, _ = sequence_logps_f64(logits, labels)
    ref, _ = sequence_logps_f64(ref_logits, labels)
    chosen_rewards, rejected_rewards = 0.5 * (logps[:B] - ref[:B]), 0.5 * (logps[B:] - ref[B:])
    scored = torch.cat([labels[:, 1:] != -100, torch.zeros(2 * B, 1, dtype=torch.bool)], dim=1)
    expected = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).double().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": logps[:B].mean(),
        "logps/rejected": logps[B:].mean(),
        "logits/chosen": logits[:B][scored[:B]].double().mean(),
        "logits/rejected": logits[B:][scored[B:]].double().mean(),
    }
    assert set(out.metrics) == set(expected)
    for name, value in expected.items():
        assert out.metrics[name].requires_grad is False
        assert abs(out.metrics[name].item() - value.item()) <= 1e-5 * max(1.0, abs(value.item())), name


def test_packed_rows_give_the_same_loss_as_one_row_per_sequence():
    hidden, ref_hidden, weight, labels = _batch(4)
    plain = fastdpo.loss(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels)
    # pack the 4 sequences into 2 rows: [seq 0 | seq 2] and [seq 1 | seq 3]
    order = [[0, 2], [1, 3]]
    packed = {name: torch.stack([torch.cat([x[i] for i in row]) for row in order])
              for name, x in (("hidden", hidden), ("ref_hidden", ref_hidden), ("labels", labels))}
    seq_ids = torch.stack([torch.cat([torch.full((T,), i) for i in row]) for row in order])
    # labels of each sequence's first token must not be scored from the previous sequence's last position
    packed["labels"][:, T] = -100
    plain_labels = labels.clone()
    plain_labels[:, 0] = -100
    plain = fastdpo.loss(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=plain_labels)
    out = fastdpo.loss(hidden=packed["hidden"], weight=weight, ref_hidden=packed["ref_hidden"],
                       labels=packed["labels"], seq_ids=seq_ids)
    assert rel_err(out.chosen_logps, plain.chosen_logps) <= 1e-6
    assert rel_err(out.loss, plain.loss) <= 1e-6


def test_sequence_without_tokens_gives_finite_length_normalised_loss():
    hidden, ref_hidden, weight, labels = _batch(5)
    labels[B] = -100  # the first rejected response has no scored token
    for loss_type in ("ipo", "sigmoid_norm", "simpo"):
        kwargs = {} if loss_type == "simpo" else {"ref_hidden": ref_hidden}
        out = fastdpo.loss(hidden=hidden.requires_grad_(), weight=weight, labels=labels, loss_type=loss_type, **kwargs)
        (grad,) = torch.autograd.grad(out.loss, hidden)
        assert torch.isfinite(out.loss) and torch.isfinite(grad).all(), loss_type


def test_combined_loss_types_are_weighted_sums():
    hidden, ref_hidden, weight, labels = _batch(6)
    parts = [fastdpo.loss(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels, loss_type=t).loss
             for t in ("sigmoid", "sft")]
    combined = fastdpo.loss(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels,
                            loss_type=["sigmoid", "sft"], loss_weights=[0.8, 0.2]).loss
    assert rel_err(combined, 0.8 * parts[0] + 0.2 * parts[1]) <= 1e-6


def test_repeated_calls_are_bitwise_identical():
    hidden, ref_hidden, weight, labels = _batch(7)
    hidden.requires_grad_()
    runs = []
    for _ in range(2):
        out = fastdpo.loss(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels)
        runs.append((out.loss, torch.autograd.grad(out.loss, hidden)[0]))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def _bad(**overrides):
    hidden, ref_hidden, weight, labels = _batch(8)
    kwargs = dict(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels)
    kwargs.update(overrides)
    return kwargs


BAD = {
    "odd number of sequences": (lambda: _bad(hidden=torch.randn(3, T, D), ref_hidden=torch.randn(3, T, D),
                                             labels=torch.randint(0, V, (3, T))), "even, non-zero number"),
    "ref_logps length": (lambda: _bad(ref_hidden=None, ref_logps=torch.zeros(3)), r"ref_logps must have shape \(4,\)"),
    "ref_logps dtype": (lambda: _bad(ref_hidden=None, ref_logps=torch.zeros(4, dtype=torch.float64)),
                        "ref_logps must be a float32"),
    "ref_logps nan": (lambda: _bad(ref_hidden=None, ref_logps=torch.tensor([0.0, float("nan"), 0.0, 0.0])),
                      "ref_logps contains NaN"),
    "two references": (lambda: _bad(ref_logps=torch.zeros(4)), "at most one reference input"),
    "no reference": (lambda: _bad(ref_hidden=None), "needs the reference model"),
    "reference shape": (lambda: _bad(ref_hidden=torch.randn(2 * B, T + 1, D)), "reference model inputs: hidden must"),
    "reference vocabulary": (lambda: _bad(ref_weight=torch.randn(V + 5, D)), "reference vocabulary"),
    "unknown loss_type": (lambda: _bad(loss_type="dpo"), "loss_type"),
    "beta": (lambda: _bad(beta=0.0), "beta must be"),
    "label_smoothing": (lambda: _bad(label_smoothing=0.6), "label_smoothing"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_raises_a_clear_error(case):
    make, message = BAD[case]
    with pytest.raises(ValueError, match=message):
        fastdpo.loss(**make())


def test_nan_in_policy_is_reported():
    kwargs = _bad()
    kwargs["hidden"][0, 5, 2] = float("inf")
    kwargs["labels"][0, 6] = 1  # position 5 is scored
    with pytest.raises(FloatingPointError, match="hidden/weight contain NaN or inf"):
        fastdpo.loss(**kwargs)


@pytest.mark.parametrize("head_mode", ["auto", "recompute"])
def test_token_metrics_come_from_the_head_pass(head_mode):
    """token_metrics=True: TRL's entropy (mean over all scored tokens) and mean_token_accuracy (chosen tokens)."""
    hidden, ref_hidden, weight, labels = _batch(7)
    weight = weight * 4  # peaked distributions: some targets are the argmax
    labels[:, 3:] = torch.where(labels[:, 3:] >= 0, (hidden[:, 2:-1] @ weight.T).argmax(-1), labels[:, 3:])
    labels[0, 4] = labels[1, 5] = 7
    out = fastdpo.loss(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels, token_metrics=True,
                       head_mode=head_mode, head_memory_budget=3 * V * 4)
    z = (hidden.double() @ weight.double().T)[:, :-1]
    targets, scored = labels[:, 1:], labels[:, 1:] != -100
    entropy = -(z.softmax(-1) * z.log_softmax(-1)).sum(-1)
    hits = (z.argmax(-1) == targets) & scored
    assert abs(out.metrics["entropy"].item() - entropy[scored].mean().item()) <= 1e-5
    want_accuracy = hits[:B].sum().item() / scored[:B].sum().item()
    assert 0 < want_accuracy < 1 and abs(out.metrics["mean_token_accuracy"].item() - want_accuracy) <= 1e-6
    plain = fastdpo.loss(hidden=hidden, weight=weight, ref_hidden=ref_hidden, labels=labels, head_mode=head_mode,
                         head_memory_budget=3 * V * 4)
    assert torch.equal(plain.loss, out.loss) and "entropy" not in plain.metrics


def test_token_metrics_refused_where_no_row_pass_forms_them():
    hidden, _, weight, labels = _batch(8)
    with pytest.raises(ValueError, match="token_stats=True needs the logits rows"):
        fastdpo.loss(hidden=hidden, weight=weight, labels=labels, reference_free=True, head_mode="fused",
                     token_metrics=True)
    with pytest.raises(ValueError, match="token metrics .* fused LM-head form"):
        fastdpo.loss(hidden @ weight.T, labels, reference_free=True, token_metrics=True)
