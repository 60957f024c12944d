"""End-to-end DPO on CPU: a tiny random Llama learns a synthetic preference in under a minute.

Preference: the chosen response continues the prompt by counting up (t, t+1, t+2, ... mod V); the rejected
response is random tokens. Pairs are packed with one shared copy of the prompt per pair, the reference is a
frozen copy of the initial policy, and the loss never materialises logits (fastdpo.model.model_loss).

    python examples/train_dpo.py --steps 200 --seed 0
"""
import argparse
import copy
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.model import model_loss
from fastdpo.packing import pack_pairs

VOCAB = 64
FIRST = 2  # token ids 0/1 reserved (0 = padding)


def make_pairs(n, gen):
    prompts, chosen, rejected = [], [], []
    for _ in range(n):
        p_len = int(torch.randint(3, 12, (1,), generator=gen))
        r_len = int(torch.randint(3, 8, (1,), generator=gen))
        prompt = torch.randint(FIRST, VOCAB, (p_len,), generator=gen).tolist()
        span = VOCAB - FIRST
        good = [FIRST + (prompt[-1] - FIRST + 1 + k) % span for k in range(r_len)]  # count up from the prompt
        bad = torch.randint(FIRST, VOCAB, (r_len,), generator=gen).tolist()
        prompts.append(prompt)
        chosen.append(good)
        rejected.append(bad)
    return prompts, chosen, rejected


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-pairs", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128, help="token budget per packed row")
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--log-every", type=int, default=1)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         attn_implementation=args.attn)
    policy = LlamaForCausalLM(config)
    policy.train()
    ref = copy.deepcopy(policy).eval().requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.lr, weight_decay=0.0)

    history = []
    start = time.time()
    for step in range(1, args.steps + 1):
        # fresh pairs every step: the metrics below are measured before the model has seen the batch
        batch = pack_pairs(*make_pairs(args.batch_pairs, gen), max_tokens=args.max_tokens, shared_prompt=True,
                           vocab_size=VOCAB)
        out = model_loss(policy, batch, ref_model=ref, beta=args.beta)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        m = {k: float(v) for k, v in out.metrics.items()}
        history.append((out.loss.item(), m["rewards/accuracies"], m["rewards/margins"]))
        if step % args.log_every == 0 or step == 1 or step == args.steps:
            print(f"step {step:4d} | loss {out.loss.item():.4f} | rewards/chosen {m['rewards/chosen']:+.3f} "
                  f"rejected {m['rewards/rejected']:+.3f} margin {m['rewards/margins']:+.3f} "
                  f"acc {m['rewards/accuracies']:.2f} | logps/chosen {m['logps/chosen']:.2f} "
                  f"| rows {batch.report.num_rows}x{batch.report.row_length} fill {batch.report.fill:.0%}",
                  flush=True)

    k = max(1, min(20, len(history) // 4))
    first = [sum(h[i] for h in history[:k]) / k for i in range(3)]
    last = [sum(h[i] for h in history[-k:]) / k for i in range(3)]
    print(f"done: {args.steps} steps in {time.time() - start:.1f}s | mean of first {k} steps: loss {first[0]:.4f} "
          f"acc {first[1]:.2f} margin {first[2]:+.3f} | last {k}: loss {last[0]:.4f} acc {last[1]:.2f} "
          f"margin {last[2]:+.3f}")
    return history


if __name__ == "__main__":
    main()
