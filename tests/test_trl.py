"""fastdpo.trl.DPOTrainer against TRL 1.16's own DPOTrainer: same steps, same metrics, same final weights.

A tiny random Llama and an in-memory word-level tokenizer (nothing downloaded); fp32 on CPU; SGD so that the
weights follow the gradients linearly (Adam would amplify rounding in near-zero gradients).
"""
import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import trl
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback

import fastdpo.trl
from fastdpo.trl import DataCollatorForPackedPreference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = [f"w{i}" for i in range(60)]


def tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def preference_dataset(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    words = lambda lo, hi: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g))  # noqa: E731,E501
    rows = [(words(2, 9), words(1, 6), words(1, 6)) for _ in range(n)]
    return Dataset.from_dict({"prompt": [p for p, _, _ in rows], "chosen": [" " + c for _, c, _ in rows],
                              "rejected": [" " + r for _, _, r in rows]})


def tiny_mixtral():
    """A tiny Mixture-of-Experts model (4 experts, top-2) and a perturbed copy as the reference."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           max_position_embeddings=64, attn_implementation="sdpa", pad_token_id=0, eos_token_id=1,
                           bos_token_id=1, router_aux_loss_coef=0.02)
    policy = MixtralForCausalLM(config)
    ref = copy.deepcopy(policy)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref


def tiny_models():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(WORDS) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation="sdpa", pad_token_id=0, eos_token_id=1, bos_token_id=1)
    policy = LlamaForCausalLM(config)
    ref = copy.deepcopy(policy)
    with torch.no_grad():  # a reference that differs from the policy, so that rewards start away from 0
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return policy, ref


class Logs(TrainerCallback):
    def __init__(self):
        self.steps = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            self.steps.append(dict(logs))


def train(trainer_cls, config_cls, tmp_path, steps=3, peft=False, with_ref=True, models=tiny_models,
          data_collator=None, dataset=preference_dataset, **options):
    policy, ref = models()
    ref = ref if with_ref else None
    peft_config = None
    if peft:
        from peft import LoraConfig
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        ref = None
    options = {"bf16": False, **options}
    args = config_cls(output_dir=str(tmp_path / trainer_cls.__module__), per_device_train_batch_size=4,
                      max_steps=steps, learning_rate=0.5, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                      report_to="none", save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                      dataloader_num_workers=0, **options)
    logs = Logs()
    trainer = trainer_cls(model=policy, ref_model=ref, args=args, train_dataset=dataset(),
                          processing_class=tokenizer(), callbacks=[logs], peft_config=peft_config,
                          data_collator=data_collator)
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    weights["total_flos"] = torch.tensor(trainer.state.total_flos, dtype=torch.float64)
    return logs.steps, weights


def assert_same_training(tmp_path, fastdpo_options=None, **options):
    want_logs, want_weights = train(trl.DPOTrainer, trl.DPOConfig, tmp_path, **options)
    got_logs, got_weights = train(fastdpo.trl.DPOTrainer, fastdpo.trl.DPOConfig, tmp_path,
                                  **options, **(fastdpo_options or {}))
    assert len(got_logs) == len(want_logs) == options.get("steps", 3)
    assert got_weights["total_flos"] == want_weights["total_flos"] > 0  # TRL's padded batch, exactly
    if options.get("include_num_input_tokens_seen", "no") != "no":
        assert want_logs[-1]["num_input_tokens_seen"] > 0
    for step, (got, want) in enumerate(zip(got_logs, want_logs)):
        assert set(got) == set(want), (set(got) ^ set(want))
        assert {"loss", "entropy", "mean_token_accuracy", "num_tokens", "logits/chosen", "rewards/margins",
                "logps/rejected", "grad_norm"} <= set(want)
        assert ("aux_loss" in want) == (options.get("models") is tiny_mixtral)
        for key, value in want.items():
            if "runtime" in key or "per_second" in key:  # wall-clock timings
                continue
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key, got[key], value)
    assert want_logs[0]["loss"] != want_logs[-1]["loss"]  # the steps did train
    assert set(got_weights) == set(want_weights)
    for name, want in want_weights.items():
        torch.testing.assert_close(got_weights[name], want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("options", [
    dict(loss_type=["sigmoid"], include_num_input_tokens_seen="all", padding_free=True),
    dict(loss_type=["ipo"], beta=0.5, include_num_input_tokens_seen="non_padding"),
    dict(loss_type=["sigmoid", "robust", "sft", "apo_zero"], loss_weights=[1.0, 0.7, 0.3, 0.5], label_smoothing=0.1),
    dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type=["sigmoid"], f_divergence_type="js_divergence", use_weighting=True),  # TRL crashes on hinge+WPO
    dict(loss_type=["sigmoid", "sigmoid_norm"], ld_alpha=0.3, use_weighting=True),
], ids=["sigmoid-tokens-seen", "ipo-non-padding-tokens", "weighted-combination", "alpha-divergence",
        "js-divergence-wpo", "ld-dpo-wpo"])
def test_same_as_trl_packed_shared_prompt(tmp_path, options):
    assert_same_training(tmp_path, **options)


@pytest.mark.parametrize("head_mode", ["fused", "recompute"])
def test_same_as_trl_in_every_head_mode(tmp_path, head_mode):
    # fused: the token metrics come from one extra no-grad pass over the head instead of the row pass
    assert_same_training(tmp_path, fastdpo_options=dict(head_mode=head_mode), loss_type=["sigmoid"])


def test_same_as_trl_separate_prompts_precomputed_reference(tmp_path):
    assert_same_training(tmp_path, fastdpo_options=dict(shared_prompt=False), loss_type=["sigmoid"],
                         precompute_ref_log_probs=True, pad_to_multiple_of=8, include_num_input_tokens_seen="all")


def test_same_as_trl_ld_dpo_masked_tail_with_precomputed_reference(tmp_path):
    """ld_alpha=0: only the first min(|y_c|, |y_r|) tokens count; the reference is precomputed with the weights."""
    assert_same_training(tmp_path, loss_type=["sigmoid"], ld_alpha=0.0, precompute_ref_log_probs=True,
                         max_length=9)


def test_same_as_trl_custom_collator_is_packed(tmp_path):
    """A custom data_collator yielding TRL's padded keys (here TRL's own, keep_end truncation, padding to a
    multiple of 4) is unpadded and packed; token counts are that collator's."""
    collator = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=0, max_length=5, pad_to_multiple_of=4,
                                                                 truncation_mode="keep_end")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates keep_end
        assert_same_training(tmp_path, fastdpo_options=dict(shared_prompt=False), data_collator=collator,
                             loss_type=["sigmoid"], max_length=5, truncation_mode="keep_end", pad_to_multiple_of=4,
                             include_num_input_tokens_seen="all")


def test_same_as_trl_mixture_of_experts_router_aux_loss(tmp_path):
    """Mixtral: TRL adds router_aux_loss_coef x the load-balancing loss of its padded batch and logs aux_loss;
    fastdpo computes it on the packed batch (the prompt counted twice, as TRL's batch holds it)."""
    assert_same_training(tmp_path, models=tiny_mixtral, loss_type=["sigmoid"], router_aux_loss_coef=0.5,
                         max_length=9)


def two_prompt_dataset():
    """preference_dataset's 8 pairs over its first 2 prompts: every batch of 4 holds pairs that share a prompt."""
    rows = preference_dataset()
    prompts = rows["prompt"][:2]
    return rows.map(lambda row, i: {"prompt": prompts[i % 2]}, with_indices=True)


@pytest.mark.parametrize("models", [tiny_models, tiny_mixtral], ids=["llama", "mixtral-router-aux-loss"])
def test_same_as_trl_grouped_prompts(tmp_path, models):
    """group_prompts=True: pairs with one prompt share one copy of it; same training as TRL's (the Mixtral router
    loss checks the token counts: a shared prompt token stands for every sequence that holds it)."""
    options = dict(router_aux_loss_coef=0.5) if models is tiny_mixtral else {}
    assert_same_training(tmp_path, fastdpo_options=dict(group_prompts=True), models=models, loss_type=["sigmoid"],
                         dataset=two_prompt_dataset, **options)


def test_collator_groups_prompts(tmp_path):
    """The packed batch holds each shared prompt once; token counts still add up to TRL's attended tokens."""
    rows = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10]},
            {"prompt_ids": [11], "chosen_ids": [12, 13], "rejected_ids": [14]},
            {"prompt_ids": [5, 6, 7], "chosen_ids": [15], "rejected_ids": [16, 17]}]
    plain, grouped = (DataCollatorForPackedPreference(group_prompts=group)(rows) for group in (False, True))
    assert grouped["packed"].input_ids.numel() == plain["packed"].input_ids.numel() - 2  # prompt[:-1] once
    for out in (plain, grouped):
        assert int(out["token_counts"].sum()) == int(out["num_tokens"]) == (3 + 2) + (3 + 1) + (1 + 2) + (1 + 1) + (
            3 + 1) + (3 + 2)  # TRL's attended tokens: prompt + completion per sequence
    batch = grouped["packed"]
    context = batch.branch_ids == 0
    assert grouped["token_counts"][context].tolist() == [4.0, 4.0]  # [5 6] stands for the 4 sequences of 2 pairs
    with pytest.raises(ValueError, match="group_prompts=True needs shared_prompt=True"):
        DataCollatorForPackedPreference(shared_prompt=False, group_prompts=True)
    assert construct(tmp_path, group_prompts=True).data_collator.group_prompts  # DPOConfig reaches the collator
    with pytest.raises(ValueError, match="DPOConfig.group_prompts=True needs shared_prompt=True"):
        fastdpo.trl.DPOConfig(output_dir="unused", use_cpu=True, bf16=False, shared_prompt=False, group_prompts=True)
    with pytest.raises(ValueError, match="group_prompts=True needs max_tokens_per_row=None"):
        DataCollatorForPackedPreference(group_prompts=True, max_tokens_per_row=64)
    with pytest.raises(ValueError, match=r"DPOConfig.group_prompts=True needs max_tokens_per_row=None .* got 64"):
        fastdpo.trl.DPOConfig(output_dir="unused", use_cpu=True, bf16=False, group_prompts=True, max_tokens_per_row=64)


def test_sft_alone_needs_no_reference(tmp_path):
    """loss_type sft: TRL runs (and ignores) a reference; fastdpo loads and runs none, same training."""
    want_logs, want_weights = train(trl.DPOTrainer, trl.DPOConfig, tmp_path, loss_type=["sft"])
    got_logs, got_weights = train(fastdpo.trl.DPOTrainer, fastdpo.trl.DPOConfig, tmp_path, with_ref=False,
                                  loss_type=["sft"])
    for got, want in zip(got_logs, want_logs):
        for key in ("loss", "logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key
    for name, want in want_weights.items():
        torch.testing.assert_close(got_weights[name], want, rtol=1e-5, atol=1e-6, msg=name)


def test_simpo_runs_no_reference_and_says_so(tmp_path, caplog, monkeypatch):
    """SimPO: no reference is loaded or run (logged); the first step's loss is fastdpo's SimPO on that batch."""
    import fastdpo.trl as fastdpo_trl
    from fastdpo.model import model_loss

    reference_forwards = []
    monkeypatch.setattr(fastdpo_trl.DPOTrainer, "compute_ref_log_probs",
                        lambda *a: reference_forwards.append(a))
    policy, _ = tiny_models()
    initial = copy.deepcopy(policy)
    args = fastdpo.trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, max_steps=1,
                                 learning_rate=0.1, optim="sgd", logging_steps=1, report_to="none", save_strategy="no",
                                 use_cpu=True, bf16=False, disable_tqdm=True, loss_type=["simpo"], beta=2.0,
                                 simpo_gamma=0.3, label_smoothing=0.1)
    logs = Logs()
    with caplog.at_level("WARNING", logger="fastdpo.trl"):
        trainer = fastdpo.trl.DPOTrainer(model=policy, args=args, train_dataset=preference_dataset(),
                                         processing_class=tokenizer(), callbacks=[logs])
    assert "no reference forward" in caplog.text and trainer.ref_model is None
    trainer.train()
    assert not reference_forwards
    batch = DataCollatorForPackedPreference()(list(trainer.train_dataset))["packed"]
    want = model_loss(initial, batch, loss_type="simpo", beta=2.0, gamma=0.3, label_smoothing=0.1)
    assert logs.steps[0]["loss"] == pytest.approx(want.loss.item(), rel=1e-5)
    assert logs.steps[0]["rewards/chosen"] == pytest.approx(want.metrics["rewards/chosen"].item(), rel=1e-5)


def test_same_as_trl_sync_ref_model_and_max_length(tmp_path):
    assert_same_training(tmp_path, loss_type=["discopop"], sync_ref_model=True, ref_model_sync_steps=1,
                         ref_model_mixup_alpha=0.5, max_length=8)


def test_same_as_trl_peft_reference_is_the_adapter_disabled_model(tmp_path):
    assert_same_training(tmp_path, peft=True, loss_type=["sigmoid"])


def test_bf16_autocast_on_cpu_close_to_trl(tmp_path):
    """TRL's default bf16=True: accelerate's CPU autocast wraps the forward; both trainers run the backbone in
    bf16, so they agree to bf16 accuracy (not bitwise: the two heads round differently)."""
    want_logs, _ = train(trl.DPOTrainer, trl.DPOConfig, tmp_path, steps=2, bf16=True, loss_type=["sigmoid"])
    got_logs, _ = train(fastdpo.trl.DPOTrainer, fastdpo.trl.DPOConfig, tmp_path, steps=2, bf16=True,
                        loss_type=["sigmoid"])
    for got, want in zip(got_logs, want_logs):
        for key in ("loss", "logps/chosen", "logps/rejected", "entropy"):
            assert got[key] == pytest.approx(want[key], rel=2e-2), key


def test_collator_packs_trl_rows():
    rows = [{"prompt_ids": [5, 6, 7], "chosen_ids": [8, 9], "rejected_ids": [10], "ref_chosen_logps": -1.5,
             "ref_rejected_logps": -2.5},
            {"prompt_ids": [11], "chosen_ids": [12, 13, 14], "rejected_ids": [15, 16], "ref_chosen_logps": -3.0,
             "ref_rejected_logps": -4.0}]
    out = DataCollatorForPackedPreference(max_length=4)(rows)
    batch = out["packed"]
    assert batch.num_pairs == 2 and batch.shared_prompt
    assert int(out["num_tokens"]) == (2 * 3 + 1 + 1) + (2 * 1 + 3 + 2)  # keep_start: [5 6 7 8] / [5 6 7 10]
    sid, lab = batch.seq_ids[:, 1:], batch.labels[:, 1:]
    assert lab[sid == 0].tolist() == [8] and lab[sid == 1].tolist() == [12, 13, 14]
    assert lab[sid == 2].tolist() == [10] and lab[sid == 3].tolist() == [15, 16]
    assert out["ref_chosen_logps"].tolist() == [-1.5, -3.0] and out["ref_rejected_logps"].dtype == torch.float64
    assert int(out["padded_tokens"]) == 2 * 2 * 4  # TRL pads 4 sequences to max_length
    assert batch.report.num_rows == 1 and batch.report.padding_tokens == 0  # default budget: one row, no padding
    with pytest.raises(ValueError, match="fills max_length"):
        DataCollatorForPackedPreference(max_length=3)(rows)
    old_names = [{"prompt_input_ids": r["prompt_ids"], "chosen_input_ids": r["chosen_ids"],
                  "rejected_input_ids": r["rejected_ids"]} for r in rows]  # TRL < 1.0 column names are read too
    assert torch.equal(DataCollatorForPackedPreference(max_length=4)(old_names)["packed"].labels, batch.labels)


@pytest.mark.parametrize("shared_prompt", [True, False])
def test_collator_keep_end_scores_what_trl_scores(shared_prompt):
    """keep_end: per sequence, the scored tokens are those TRL's padded batch scores (completion tokens in the
    kept window, past its first position); token_counts add up to TRL's attended tokens."""
    g = torch.Generator().manual_seed(0)
    rows = [{name: torch.randint(3, 60, (int(torch.randint(1, 9, (1,), generator=g)),), generator=g).tolist()
             for name in ("prompt_ids", "chosen_ids", "rejected_ids")} for _ in range(12)]
    want = trl.trainer.dpo_trainer.DataCollatorForPreference(pad_token_id=0, max_length=6,
                                                             truncation_mode="keep_end")(rows)
    out = DataCollatorForPackedPreference(max_length=6, truncation_mode="keep_end", shared_prompt=shared_prompt)(rows)
    batch = out["packed"]
    assert batch.num_pairs == 12 and batch.report.num_pairs > 12  # some pairs became two entries
    scored = want["input_ids"][:, 1:].masked_fill(want["completion_mask"][:, 1:] == 0, -1)
    for sequence in range(24):
        trl_tokens = scored[sequence][scored[sequence] >= 0].tolist()
        assert batch.labels[batch.seq_ids == sequence].tolist() == trl_tokens, sequence
    assert int(out["num_tokens"]) == int(want["attention_mask"].sum()) == int(out["token_counts"].sum())
    assert int(out["padded_tokens"]) == want["input_ids"].numel()


@pytest.mark.parametrize("rows,error,match", [
    ([], ValueError, "the batch is empty"),
    ([{"prompt": [1], "chosen": [2], "rejected": [3]}], ValueError, r"row 0: a preference row mapping needs the keys"),
    ([{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "ref_chosen_logps": -1.0,
       "ref_rejected_logps": -2.0}, {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3]}],
     ValueError, r"ref_chosen_logps: rows \[1\] of the batch lack it"),
    ([{"prompt_ids": [1, 2], "chosen_ids": [2, 3, 4], "rejected_ids": [3]}], ValueError,
     r"max_tokens_per_row=5: pair 0 of this batch needs 7 tokens"),
], ids=["empty", "unknown-columns", "partial-ref-logps", "pair-over-budget"])
def test_collator_bad_batches(rows, error, match):
    with pytest.raises(error, match=match):
        DataCollatorForPackedPreference(max_tokens_per_row=5)(rows)


def construct(tmp_path, ref=True, **options):
    policy, reference = tiny_models()
    args = fastdpo.trl.DPOConfig(**{**dict(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True),
                                    **options})
    return fastdpo.trl.DPOTrainer(model=policy, ref_model=reference if ref else None, args=args,
                                  train_dataset=preference_dataset(), processing_class=tokenizer())


@pytest.mark.parametrize("options,match,tokenized", [
    (dict(ld_alpha=1.5), r"DPOConfig.ld_alpha must lie in \[0.0, 1.0\]", False),
    (dict(ld_alpha=0.5, loss_type=["sigmoid", "sft"]), "ld_alpha=0.5 with loss_type 'sft'", False),
    (dict(loss_type=["robust"], label_smoothing=0.6), "label_smoothing", False),
    (dict(loss_type=["no_such_loss"]), "loss_type", False),
    (dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("nan")),
     "f_alpha_divergence_coef", False),
    (dict(router_aux_loss_coef=0.1), "router_aux_loss_coef=0.1: LlamaForCausalLM is not a Mixture-of-Experts", False),
    (dict(loss_type=["simpo"]), "ref_model: loss_type", False),
    (dict(loss_type=["sft"], sync_ref_model=True, ref=False), "sync_ref_model: loss_type", False),
    (dict(loss_type=["simpo"], precompute_ref_log_probs=True, ref=False), "precompute_ref_log_probs: loss_type",
     False),
    (dict(include_for_metrics=["inputs"]), r"include_for_metrics=\['inputs'\]", False),
    (dict(max_tokens_per_row=6, precompute_ref_log_probs=True), "DPOConfig.max_tokens_per_row=6 is smaller than pair",
     True),
], ids=["ld_alpha-range", "ld_alpha-sft", "label_smoothing", "loss_type", "f_alpha", "router_aux_loss_coef",
        "simpo-ref_model", "sft-sync_ref_model", "simpo-precompute", "include_for_metrics-inputs",
        "max_tokens_per_row"])
def test_unsupported_options_are_refused_at_construction(tmp_path, monkeypatch, options, match, tokenized):
    """Refused with the option's name, before tokenization (or, for what depends on token counts, as TRL
    tokenizes: before any reference precompute)."""
    tokenizations, precomputes = [], []
    tokenize = trl.DPOTrainer._prepare_dataset

    def counted_tokenize(self, *args):
        tokenizations.append(args[-1])
        return tokenize(self, *args)

    monkeypatch.setattr(trl.DPOTrainer, "_prepare_dataset", counted_tokenize)
    monkeypatch.setattr(trl.DPOTrainer, "_precompute_ref_logps", lambda *a: precomputes.append(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates keep_end
        with pytest.raises((ValueError, NotImplementedError), match=match):
            construct(tmp_path, **options)
    assert bool(tokenizations) == tokenized and not precomputes



def test_config_validates_fastdpo_fields_in_its_own_words(tmp_path):
    config = lambda **options: fastdpo.trl.DPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False,  # noqa
                                                     **options)
    for value, error in ((0, ValueError), (-1, ValueError), (3, ValueError), (2.5, TypeError), ("4", TypeError)):
        with pytest.raises(error, match=r"DPOConfig.max_tokens_per_row must be an int"):
            config(max_tokens_per_row=value)
    with pytest.raises(TypeError, match="DPOConfig.shared_prompt must be a bool"):
        config(shared_prompt="no")
    with pytest.raises(TypeError, match="DPOConfig.group_prompts must be a bool"):
        config(group_prompts=1)
    with pytest.raises(ValueError, match="DPOConfig.truncation_mode must be"):
        config(truncation_mode="keep_middle")
    assert config(max_tokens_per_row=4).max_tokens_per_row == 4
    with pytest.raises(ValueError, match="DPOConfig.head_mode must be one of"):
        config(head_mode="chunked")
    with pytest.raises(ValueError, match="DPOConfig.head_memory_budget must be None or a positive int"):
        config(head_memory_budget=0)


# Each TRL 1.16 DPOConfig field (declared by DPOConfig or TRL's base config) with a non-default value, and the
# words of the refusal when fastdpo refuses that value (None: honoured; the parity tests train with it).
# activation_offloading needs CUDA (TRL's own offloading fails on CPU) and use_liger_kernel needs liger-kernel:
# on a machine without them these two keep their defaults.
TRL_FIELD_PROBES = {
    "learning_rate": (1e-3, None), "model_init_kwargs": ({"dtype": "float32"}, None),
    "trust_remote_code": (True, None), "router_aux_loss_coef": (0.1, "router_aux_loss_coef"),
    "disable_dropout": (False, None), "dataset_num_proc": (1, None), "max_length": (32, None),
    "truncation_mode": ("keep_end", None), "padding_free": (True, None), "pad_to_multiple_of": (8, None),
    "precompute_ref_log_probs": (True, None), "precompute_ref_batch_size": (2, None),
    "loss_type": (["hinge"], None), "loss_weights": ([0.5], None), "ld_alpha": (0.5, None),
    "f_divergence_type": ("forward_kl", None), "f_alpha_divergence_coef": (0.3, None),
    "label_smoothing": (0.1, None), "beta": (0.3, None), "use_weighting": (True, None),
    "discopop_tau": (0.1, None), "activation_offloading": (torch.cuda.is_available(), None),
    "sync_ref_model": (True, None),
    "ref_model_mixup_alpha": (0.5, None), "ref_model_sync_steps": (2, None), "pad_token": ("<eos>", None),
    "logging_steps": (2, None), "gradient_checkpointing": (False, None), "lr_scheduler_kwargs": ({}, None),
    "use_liger_kernel": (False, None), "torch_empty_cache_steps": (4, None), "bf16": (True, None),
}


def test_every_trl_dpo_config_field_is_honoured_or_refused(tmp_path):
    """The walk over TRL 1.16's DPOConfig fields: fastdpo's status table and these probes cover each one; a
    non-default value either constructs the trainer (the value is TRL's to apply, or fastdpo's) or is refused
    at construction with an error naming the field."""
    import dataclasses

    trl_fields = set(trl.DPOConfig.__annotations__) | set(trl.trainer.base_config._BaseConfig.__annotations__)
    assert trl_fields <= {f.name for f in dataclasses.fields(trl.DPOConfig)}
    assert trl_fields == set(fastdpo.trl.TRL_CONFIG_FIELDS) == set(TRL_FIELD_PROBES)
    for name, (value, refusal) in TRL_FIELD_PROBES.items():
        status = fastdpo.trl.TRL_CONFIG_FIELDS[name]
        assert status.startswith("supported") or status.startswith("refused"), (name, status)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TRL's deprecations (pad_token, keep_end)
            if refusal is None:
                construct(tmp_path, **{name: value})
            else:
                with pytest.raises((ValueError, NotImplementedError), match=refusal):
                    construct(tmp_path, **{name: value})


def test_evaluation_predictions_for_compute_metrics(tmp_path):
    """prediction_loss_only=False: compute_metrics gets per-pair (chosen logp, rejected logp, chosen reward,
    rejected reward) and zero labels; their means are the logged eval metrics, which equal TRL's."""
    seen = []

    def compute_metrics(prediction):
        seen.append(prediction)
        return {"reward_accuracy": float((prediction.predictions[:, 2] > prediction.predictions[:, 3]).mean())}

    policy, ref = tiny_models()
    common = dict(output_dir=str(tmp_path), per_device_eval_batch_size=8, report_to="none", bf16=False, use_cpu=True,
                  disable_tqdm=True)
    data = dict(train_dataset=preference_dataset(), eval_dataset=preference_dataset(8, seed=1),
                processing_class=tokenizer())
    want = trl.DPOTrainer(model=copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=trl.DPOConfig(**common),
                          **data).evaluate()
    trainer = fastdpo.trl.DPOTrainer(model=policy, ref_model=ref, args=fastdpo.trl.DPOConfig(**common),
                                     compute_metrics=compute_metrics, **data)
    got = trainer.evaluate()
    (prediction,) = seen
    assert prediction.predictions.shape == (8, 4) and (prediction.label_ids == 0).all()
    for column, key in enumerate(("logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")):
        assert prediction.predictions[:, column].mean() == pytest.approx(want[f"eval_{key}"], rel=1e-5, abs=1e-6)
        assert got[f"eval_{key}"] == pytest.approx(want[f"eval_{key}"], rel=1e-5, abs=1e-6)
    assert got["eval_reward_accuracy"] == pytest.approx(want["eval_rewards/accuracies"])
    loss, outputs = trainer.compute_loss(trainer.model, trainer._prepare_inputs(
        trainer.data_collator(list(trainer.eval_dataset))), return_outputs=True)
    assert set(outputs) >= set(fastdpo.trl.PREDICTION_COLUMNS) | {"losses", "metrics", "ref_chosen_logps"}
    assert loss.item() == pytest.approx(want["eval_loss"], rel=1e-5)


def test_float64_reference_log_probs_keep_their_dtype(tmp_path):
    policy, ref = (model.double() for model in tiny_models())
    args = fastdpo.trl.DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True,
                                 precompute_ref_log_probs=True)
    trainer = fastdpo.trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=preference_dataset(),
                                     processing_class=tokenizer())
    inputs = trainer._prepare_inputs(trainer.data_collator(list(trainer.train_dataset)))
    assert inputs["ref_chosen_logps"].dtype == torch.float64
    _, outputs = trainer.compute_loss(trainer.model, inputs, return_outputs=True)
    assert outputs["ref_chosen_logps"].dtype == torch.float64
    assert torch.equal(outputs["ref_chosen_logps"], inputs["ref_chosen_logps"])  # not rounded to fp32 on the way
    with torch.no_grad():
        on_the_fly = torch.cat(trainer.compute_ref_log_probs(ref, inputs))
    assert on_the_fly.dtype == torch.float64


def test_padding_free_is_accepted_without_trl_fallback_warning(tmp_path, caplog):
    with caplog.at_level("WARNING"):
        trainer = construct(tmp_path, padding_free=True)
    assert "padding_free" not in caplog.text and trainer.args.padding_free


def test_same_as_trl_keep_end_mixture_of_experts_ld_dpo(tmp_path):
    """keep_end cuts the chosen and rejected sequences of a pair at different prompt tokens (or into the
    completion): such pairs are packed as two entries; the router loss counts their tokens as TRL's batch."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates keep_end
        assert_same_training(tmp_path, models=tiny_mixtral, loss_type=["sigmoid"], truncation_mode="keep_end",
                             max_length=6, ld_alpha=0.5, router_aux_loss_coef=0.5)


def test_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "trl_dpo.py"), "--max-steps", "2",
                          "--pairs", "8", "--output-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rewards/accuracies" in res.stdout and "done: 2 steps" in res.stdout
