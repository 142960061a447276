#!/usr/bin/env python
"""Export a checkpoint as a Hugging Face GPT2LMHeadModel folder, or a mixture in nemoe's own format.

    python tools/export_hf.py checkpoints/<run> -o gpt2-export       # one expert per layer: GPT-2
    python tools/export_hf.py checkpoints/<run> -o moe-export        # a mixture: nemoe's format
    python tools/generate.py moe-export --prompt "Hello"             # read back without pickle

--format auto (the default) picks gpt2 when every layer has exactly one live expert
(a dense model, e.g. trained with moe.experts_max=1), and nemoe otherwise.

gpt2: config.json + model.safetensors (+ generation_config.json), loaded by
`transformers.GPT2LMHeadModel.from_pretrained(DIR)`. Its context is the model's
seq_len. Head gates, layer influence and attention temperature are folded into the
weights; a pruned head is exported as zeroed q/k/v rows and proj columns.
A mixture is refused in this format: no transformers class holds GPT-2's blocks
with nemoe's routed experts.

nemoe: model.safetensors (the model's tensors) + nemoe.json (config, step, tokens,
expert records). tools/generate.py and tools/evaluate.py take the folder as their
CHECKPOINT; nothing in it is pickled.

Either way the folder is read back after writing and its logits compared with the
checkpoint's on a fixed batch; the largest difference is printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from nemoe import checkpoint_layout as layout
from nemoe.errors import UserError
from tools.checkpoints import checkpoint_parser, load_model
from tools.cli import guard

TOLERANCE = 1e-4   # fp32: the folded weights differ from the model's by rounding only


def parse_args(argv):
    p = checkpoint_parser(__doc__)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write (new or empty)")
    p.add_argument("--format", choices=("auto", "gpt2", "nemoe"), default="auto",
                   help="gpt2 (transformers GPT2LMHeadModel), nemoe (safetensors + JSON) or auto (default)")
    return p.parse_args(argv)


def logits_check(model, reload, vocab_size: int, seq_len: int) -> float:
    """Max |logits difference| between `model` and `reload(tokens)` on a fixed random batch."""
    import torch
    tokens = torch.randint(0, vocab_size, (2, min(seq_len, 32)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return float((model(tokens).logits - reload(tokens)).abs().max())


@guard
def main(argv=None):
    args = parse_args(argv)
    from nemoe.pretrained import mixture_layers, quiet_transformers, write_gpt2, write_nemoe   # torch: after --help

    out = Path(args.output).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out}: exists and is not an empty folder; choose a new -o DIR")
    model, cfg, state, path = load_model(args.checkpoint, "cpu")
    fmt = args.format if args.format != "auto" else ("nemoe" if mixture_layers(model) else "gpt2")
    if fmt == "gpt2" and cfg.data.tokenizer != "gpt2":
        raise UserError(f"{path}: trained on {cfg.data.tokenizer} tokens; only GPT-2-tokenized models export "
                        "to transformers (-f gpt2). Use -f nemoe to keep it in nemoe's format.")
    if fmt == "gpt2":
        write_gpt2(model, cfg, out)
        from transformers import GPT2LMHeadModel
        with quiet_transformers():
            hf = GPT2LMHeadModel.from_pretrained(out).eval()
        diff = logits_check(model, lambda t: hf(t).logits, cfg.model.vocab_size, cfg.model.seq_len)
        what, reader = "config.json + model.safetensors", "transformers' GPT2LMHeadModel"
    else:
        write_nemoe(model, state, out)
        again = load_model(out, "cpu")[0]
        diff = logits_check(model, lambda t: again(t).logits, cfg.model.vocab_size, cfg.model.seq_len)
        what, reader = "model.safetensors + nemoe.json", "nemoe's reader"
    if not diff <= TOLERANCE:
        raise UserError(f"{out}: written, but {reader} computes logits up to {diff:.3g} away from the "
                        f"checkpoint's (tolerance {TOLERANCE}); please report this")
    print(f"wrote {out} ({fmt}: {what}) from {path} (step {layout.step(state):,})")
    print(f"checked: {reader} reproduces the checkpoint's logits, max |difference| {diff:.2e}")


if __name__ == "__main__":
    sys.exit(main())
