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


def train(trainer_cls, config_cls, tmp_path, steps=3, peft=False, **options):
    policy, ref = tiny_models()
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
    trainer = trainer_cls(model=policy, ref_model=ref, args=args, train_dataset=preference_dataset(),
                          processing_class=tokenizer(), callbacks=[logs], peft_config=peft_config)
    trainer.train()
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return logs.steps, weights


def assert_same_training(tmp_path, fastdpo_options=None, **options):
    want_logs, want_weights = train(trl.DPOTrainer, trl.DPOConfig, tmp_path, **options)
    got_logs, got_weights = train(fastdpo.trl.DPOTrainer, fastdpo.trl.DPOConfig, tmp_path,
                                  **options, **(fastdpo_options or {}))
    assert len(got_logs) == len(want_logs) == options.get("steps", 3)
    for step, (got, want) in enumerate(zip(got_logs, want_logs)):
        assert set(got) == set(want), (set(got) ^ set(want))
        assert {"loss", "entropy", "mean_token_accuracy", "num_tokens", "logits/chosen", "rewards/margins",
                "logps/rejected", "grad_norm"} <= set(want)
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key, got[key], value)
    assert want_logs[0]["loss"] != want_logs[-1]["loss"]  # the steps did train
    assert set(got_weights) == set(want_weights)
    for name, want in want_weights.items():
        torch.testing.assert_close(got_weights[name], want, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("options", [
    dict(loss_type=["sigmoid"]),
    dict(loss_type=["ipo"], beta=0.5),
    dict(loss_type=["sigmoid", "robust", "sft", "apo_zero"], loss_weights=[1.0, 0.7, 0.3, 0.5], label_smoothing=0.1),
    dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3),
    dict(loss_type=["sigmoid"], f_divergence_type="js_divergence", use_weighting=True),  # TRL crashes on hinge+WPO
], ids=["sigmoid", "ipo", "weighted-combination", "alpha-divergence", "js-divergence-wpo"])
def test_same_as_trl_packed_shared_prompt(tmp_path, options):
    assert_same_training(tmp_path, **options)


def test_same_as_trl_separate_prompts_precomputed_reference(tmp_path):
    assert_same_training(tmp_path, fastdpo_options=dict(shared_prompt=False), loss_type=["sigmoid"],
                         precompute_ref_log_probs=True)


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
    assert out["ref_chosen_logps"].tolist() == [-1.5, -3.0] and out["ref_rejected_logps"].dtype == torch.float32
    assert batch.report.num_rows == 1 and batch.report.padding_tokens == 0  # default budget: one row, no padding
    with pytest.raises(ValueError, match="fills max_length"):
        DataCollatorForPackedPreference(max_length=3)(rows)


@pytest.mark.parametrize("options,match", [
    (dict(ld_alpha=0.5), "ld_alpha"),
    (dict(loss_type=["robust"], label_smoothing=0.6), "label_smoothing"),
    (dict(loss_type=["no_such_loss"]), "loss_type"),
    (dict(loss_type=["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=float("nan")),
     "f_alpha_divergence_coef"),
    (dict(truncation_mode="keep_end"), "truncation_mode"),
])
def test_unsupported_options_are_refused_at_construction(tmp_path, options, match):
    policy, ref = tiny_models()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TRL deprecates keep_end
        args = fastdpo.trl.DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True, **options)
    with pytest.raises((ValueError, NotImplementedError), match=match):
        fastdpo.trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=preference_dataset(),
                               processing_class=tokenizer())


def test_custom_collator_and_compute_metrics_are_refused(tmp_path):
    policy, ref = tiny_models()
    args = fastdpo.trl.DPOConfig(output_dir=str(tmp_path), report_to="none", bf16=False, use_cpu=True)
    common = dict(model=policy, ref_model=ref, args=args, train_dataset=preference_dataset(),
                  processing_class=tokenizer())
    with pytest.raises(ValueError, match="data_collator"):
        fastdpo.trl.DPOTrainer(**common, data_collator=trl.trainer.dpo_trainer.DataCollatorForPreference(0))
    with pytest.raises(ValueError, match="compute_metrics"):
        fastdpo.trl.DPOTrainer(**common, compute_metrics=lambda p: {})


def test_example_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    res = subprocess.run([sys.executable, os.path.join(REPO, "examples", "trl_dpo.py"), "--max-steps", "2",
                          "--pairs", "8", "--output-dir", str(tmp_path)], capture_output=True, text=True,
                         timeout=180, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "rewards/accuracies" in res.stdout and "done: 2 steps" in res.stdout
