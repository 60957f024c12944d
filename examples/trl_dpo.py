"""TRL's DPOTrainer with fastdpo's loss: the one-import switch, offline on CPU.

A tiny random Llama and a word-level tokenizer are built in memory (nothing is downloaded). The preference
data is text, as in any TRL data set: the chosen response continues the prompt's count (w5 w6 -> w7 w8 ...),
the rejected one is random words. Everything below is plain TRL except the import.

    python examples/trl_dpo.py --max-steps 40
    accelerate launch --num_processes 2 examples/trl_dpo.py   # multi-GPU / multi-process: the same script
    torchrun --nproc_per_node 2 examples/trl_dpo.py --batch-size 8   # 2 CPU processes (gloo), global batch 16
"""
import argparse
import random

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from fastdpo.trl import DPOConfig, DPOTrainer  # was: from trl import DPOConfig, DPOTrainer

WORDS = [f"w{i}" for i in range(40)]


def build_tokenizer():
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def build_dataset(pairs, seed):
    rng = random.Random(seed)
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(pairs):
        start, n_prompt, n_response = rng.randrange(len(WORDS)), rng.randint(3, 10), rng.randint(2, 6)
        count = lambda first, n: " ".join(WORDS[(first + k) % len(WORDS)] for k in range(n))  # noqa: E731
        rows["prompt"].append(count(start, n_prompt))
        rows["chosen"].append(" " + count(start + n_prompt, n_response))
        rows["rejected"].append(" " + " ".join(rng.choice(WORDS) for _ in range(n_response)))
    return Dataset.from_dict(rows)


class PrintMetrics(TrainerCallback):
    def on_log(self, args, state, control, logs=None, **kwargs):
        if "loss" in logs:
            print(f"step {state.global_step:3d} | loss {logs['loss']:.4f} | rewards/margins "
                  f"{logs['rewards/margins']:+.3f} rewards/accuracies {logs['rewards/accuracies']:.2f} | "
                  f"logps/chosen {logs['logps/chosen']:.2f} | entropy {logs['entropy']:.3f} | "
                  f"num_tokens {int(logs['num_tokens'])}", flush=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-steps", type=int, default=40)
    ap.add_argument("--pairs", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16, help="pairs per process and step")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output-dir", default="trl_dpo_output")
    args = ap.parse_args(argv)

    tokenizer = build_tokenizer()
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, eos_token_id=1, bos_token_id=1))
    ref_model = LlamaForCausalLM(model.config)  # a frozen copy of the initial policy
    ref_model.load_state_dict(model.state_dict())

    config = DPOConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.batch_size,
        learning_rate=3e-3,
        beta=0.1, loss_type=["sigmoid"], logging_steps=max(1, args.max_steps // 10), report_to="none",
        save_strategy="no", seed=args.seed, bf16=torch.cuda.is_available(), disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),  # CPU: accelerate's MULTI_CPU (gloo); else each process trains alone
        shared_prompt=True,  # fastdpo: one copy of the prompt per pair (the default)
    )
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=config, train_dataset=build_dataset(args.pairs, args.seed),
                         processing_class=tokenizer, callbacks=[PrintMetrics()])
    trainer.remove_callback(PrinterCallback)  # PrintMetrics prints a shorter line
    result = trainer.train()
    print(f"done: {trainer.state.global_step} steps in {result.metrics['train_runtime']:.1f}s, "
          f"final loss {trainer.state.log_history[-2]['loss']:.4f}")


if __name__ == "__main__":
    main()
