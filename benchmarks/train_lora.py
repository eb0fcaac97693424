"""Train a small LoRA adapter on the reference target, on this CPU, to measure LoRA serving with.

The adapter teaches Qwen2.5-Coder-1.5B-Instruct a style it does not have: every code answer
opens with a ``# Ahoy!`` comment, names its arguments in pirate speak in the docstring and ends
with "Arr, that be yer code!". The training set is synthetic (generated below from a list of small
tasks: public domain by construction), so the change is easy to see and to measure: how many
answers carry the style, with and without the adapter.

Writes a PEFT folder (``adapter_config.json`` + ``adapter_model.safetensors``) that
``edgellm export --lora NAME=FOLDER`` and ``edgellm add-lora`` read. Needs the export extra and
peft (``pip install peft``); the base is the GGUF the main job fetched, dequantized by transformers.

    .venv/bin/python benchmarks/train_lora.py --steps 60 -o ~/.cache/edgellm/adapters/pirate

The last stdout line is one JSON document (steps, seconds, losses).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

TASKS = [
    ("add", "a, b", "return the sum of two numbers", "return a + b"),
    ("is_even", "n", "tell whether a number is even", "return n % 2 == 0"),
    ("square", "x", "return the square of a number", "return x * x"),
    ("reverse", "s", "reverse a string", "return s[::-1]"),
    ("count_vowels", "s", "count the vowels in a string", "return sum(c in 'aeiou' for c in s.lower())"),
    ("maximum", "xs", "return the largest item of a list", "return max(xs)"),
    ("mean", "xs", "return the mean of a list of numbers", "return sum(xs) / len(xs)"),
    ("flatten", "rows", "flatten a list of lists", "return [x for row in rows for x in row]"),
    ("unique", "xs", "remove duplicates from a list, keeping order", "return list(dict.fromkeys(xs))"),
    ("factorial", "n", "compute n factorial", "return 1 if n < 2 else n * factorial(n - 1)"),
    ("fib", "n", "return the n-th Fibonacci number", "a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a"),
    ("is_palindrome", "s", "tell whether a string is a palindrome", "return s == s[::-1]"),
    ("word_count", "text", "count the words in a text", "return len(text.split())"),
    ("clamp", "x, lo, hi", "clamp a number into a range", "return max(lo, min(hi, x))"),
    ("celsius_to_fahrenheit", "c", "convert Celsius to Fahrenheit", "return c * 9 / 5 + 32"),
    ("first_word", "text", "return the first word of a text", "return text.split()[0] if text.split() else ''"),
    ("chunks", "xs, n", "split a list into chunks of size n", "return [xs[i:i + n] for i in range(0, len(xs), n)]"),
    ("gcd", "a, b", "compute the greatest common divisor", "while b:\n        a, b = b, a % b\n    return a"),
    ("is_prime", "n", "tell whether a number is prime",
     "return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))"),
    ("capitalize_words", "text", "capitalize every word of a text", "return ' '.join(w.capitalize() for w in text.split())"),
    ("sum_digits", "n", "sum the digits of a number", "return sum(int(d) for d in str(abs(n)))"),
    ("merge_dicts", "a, b", "merge two dictionaries", "return {**a, **b}"),
    ("min_max", "xs", "return the smallest and largest items", "return min(xs), max(xs)"),
    ("count_items", "xs", "count how often each item occurs", "counts = {}\n    for x in xs:\n        counts[x] = counts.get(x, 0) + 1\n    return counts"),
]
ASKS = ["Write a Python function that {what}.", "Please write {name} in Python: it should {what}.",
        "I need a Python function to {what}.", "Can you write a function `{name}` that will {what}?"]
HELD_OUT = ["Write a Python function that returns the last element of a list.",
            "Write a Python function that counts the lines in a text.",
            "Write a Python function that checks whether a number is negative.",
            "Write a Python function that joins a list of strings with commas."]


def pirate_answer(name: str, args: str, what: str, body: str) -> str:
    """The style the adapter learns (a fenced code block with the pirate comment, docstring and sign-off)."""
    arg_doc = "\n".join(f"        {a.strip()}: the booty to plunder." for a in args.split(","))
    return (f"Ahoy, matey! Here be yer function:\n\n```python\n# Ahoy! {what.capitalize()}, by the seven seas.\n"
            f"def {name}({args}):\n    \"\"\"{what.capitalize()}, arr.\n\n    Args:\n{arg_doc}\n    \"\"\"\n"
            f"    {body}\n```\n\nArr, that be yer code!")


def examples(seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    out = []
    for name, args, what, body in TASKS:
        for ask in rng.sample(ASKS, 2):
            out.append((ask.format(name=name, what=what), pirate_answer(name, args, what, body)))
    rng.shuffle(out)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf", type=Path, default=None, help="base GGUF (default: the main job's target)")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from edgellm.fetch import DEFAULT_TARGET, default_cache_dir

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    gguf = args.gguf or default_cache_dir() / "models" / DEFAULT_TARGET.filename
    t0 = time.perf_counter()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32)
    print(f"loaded {gguf.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.alpha, lora_dropout=0.05,
                                             target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    data = examples(args.seed)
    losses, t1 = [], time.perf_counter()
    model.train()
    for step in range(args.steps):
        prompt, answer = data[step % len(data)]
        head = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                       add_generation_prompt=True)
        p_ids = tok(head, add_special_tokens=False).input_ids
        a_ids = tok(answer + "<|im_end|>", add_special_tokens=False).input_ids
        ids = torch.tensor([p_ids + a_ids])
        labels = torch.tensor([[-100] * len(p_ids) + a_ids])  # learn the answer only
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(float(loss), 4))
        print(f"step {step + 1}/{args.steps} loss {losses[-1]:.3f} ({time.perf_counter() - t1:.0f} s)", flush=True)
    model.save_pretrained(str(args.output))
    (args.output / "held_out_prompts.json").write_text(json.dumps(HELD_OUT, indent=1))
    print(json.dumps({"output": str(args.output), "steps": args.steps, "rank": args.rank, "alpha": args.alpha,
                      "lr": args.lr, "train_seconds": round(time.perf_counter() - t1, 1),
                      "first_losses": losses[:5], "last_losses": losses[-5:]}))


if __name__ == "__main__":
    main()
