#!/usr/bin/env python
"""Sample text from a checkpoint (any expert topology, CPU or GPU).

    python tools/generate.py checkpoints/<run>/nemo_ckpt_step1000.pt --prompt "The quick brown fox"
    python tools/generate.py checkpoints/<run> --prompt "def main(" --max-new-tokens 100 --seed 1

CHECKPOINT is a checkpoint file, or a run's checkpoint (or log) folder, whose
newest loadable checkpoint is used. The model is rebuilt from the config saved
in the checkpoint. The text goes to stdout; where it came from goes to stderr.
"""

from __future__ import annotations

import json
import sys

from nemoe import checkpoint_layout as layout
from nemoe.errors import UserError
from tools.checkpoints import checkpoint_parser, load_model
from tools.cli import guard, note


def parse_args(argv):
    p = checkpoint_parser(__doc__)
    p.add_argument("--prompt", default="The quick brown fox", help='text to continue (default: "%(default)s")')
    p.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens to sample (default: 64)")
    p.add_argument("--temperature", type=float, default=0.8, metavar="T",
                   help="softmax temperature; 0 means greedy (default: 0.8)")
    p.add_argument("--top-k", type=int, default=50, metavar="K",
                   help="sample among the k likeliest tokens; 0 = all (default: 50)")
    p.add_argument("--seed", type=int, default=1337, metavar="S", help="sampling seed (default: 1337)")
    p.add_argument("--samples", type=int, default=1, metavar="N", help="independent continuations (default: 1)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--json", action="store_true",
                   help="print JSON: prompt, completions and their token ids")
    return p.parse_args(argv)


def check(args) -> None:
    problems = []
    if args.max_new_tokens < 1:
        problems.append("--max-new-tokens must be >= 1")
    if args.temperature < 0:
        problems.append("--temperature must be >= 0")
    if args.top_k < 0:
        problems.append("--top-k must be >= 0")
    if args.samples < 1:
        problems.append("--samples must be >= 1")
    if problems:
        raise UserError("; ".join(problems))


@guard
def main(argv=None):
    args = parse_args(argv)
    check(args)
    import torch
    from nemoe.tokenizer import get_tokenizer   # torch and tiktoken only after the arguments are checked

    model, cfg, state, path = load_model(args.checkpoint, args.device)
    device = next(model.parameters()).device
    tokenizer = get_tokenizer(cfg.data.tokenizer)
    prompt_ids = tokenizer.encode(args.prompt) or [tokenizer.eot_id]   # empty prompt: start of a document
    if len(prompt_ids) > cfg.model.seq_len:
        note(f"the prompt has {len(prompt_ids)} tokens; the model sees the last {cfg.model.seq_len}")
    print(f"{path} | step {layout.step(state):,} | device {device} | {args.max_new_tokens} new tokens",
          file=sys.stderr)

    generator = torch.Generator(device=device).manual_seed(args.seed)
    idx = torch.tensor([prompt_ids] * args.samples, dtype=torch.long, device=device)   # (S, T0)
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, generator=generator)           # (S, T0 + N)
    new_ids = out[:, len(prompt_ids):].tolist()
    # A vocabulary padded beyond the tokenizer's (e.g. 50304) has ids with no text.
    completions = [tokenizer.decode([t for t in ids if t < tokenizer.n_vocab]) for ids in new_ids]

    if args.json:
        print(json.dumps({"checkpoint": str(path), "step": layout.step(state), "prompt": args.prompt,
                          "prompt_tokens": prompt_ids, "completions": completions, "tokens": new_ids},
                         ensure_ascii=False))
        return
    for i, text in enumerate(completions):
        if args.samples > 1:
            print(f"--- sample {i + 1} ---")
        print(args.prompt + text)


if __name__ == "__main__":
    sys.exit(main())
