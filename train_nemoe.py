#!/usr/bin/env python
"""Train a nemoe model.

    python train_nemoe.py --config local.yaml              # offline, CPU, built-in corpus
    python train_nemoe.py --config t4.yaml                 # Colab T4, streamed web text
    python train_nemoe.py --config t4.yaml --resume        # after a disconnect
    python train_nemoe.py --init-from gpt2                 # upcycle a pretrained GPT-2 (configs/pretrained.yaml)
    python train_nemoe.py --config t4.yaml --run-dir /content/nemoe --mirror-dir /content/drive/MyDrive/nemoe --resume
    torchrun --nproc_per_node 2 train_nemoe.py --config local.yaml   # data-parallel (DDP)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nemoe.errors import UserError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Train a neuro-evolutionary mixture-of-experts LM.")
    p.add_argument("--config", default=None,
                   help="NAME, configs/NAME or configs/NAME.yaml (default: local.yaml; pretrained.yaml with "
                        "--init-from)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set train.lr=3e-4 (repeatable)")
    p.add_argument("--run-name", default=None, help="run folder name (default: the config's name)")
    p.add_argument("--run-dir", default=".", help="where logs/ and checkpoints/ go (default: .)")
    p.add_argument("--mirror-dir", default=None, metavar="DIR",
                   help="also copy every checkpoint and the logs to DIR/checkpoints, DIR/logs in the background, "
                        "verified (e.g. Google Drive; sets checkpoint.mirror_dir); --resume looks in both")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest valid checkpoint of this run (none yet: start fresh)")
    p.add_argument("--allow-config-change", action="store_true",
                   help="with --resume: accept changed model/expert/data settings (shapes must still match)")
    p.add_argument("--cycles", type=int, default=None, metavar="N",
                   help="attention-head plasticity in cycle mode, N train/prune/measure/grow/learn cycles: "
                        "short for --set plasticity.heads.enabled=true --set plasticity.heads.mode=cycle "
                        "--set plasticity.heads.cycles=N")
    p.add_argument("--init-from", default=None, metavar="SOURCE",
                   help="start from a pretrained GPT-2-family model: a Hugging Face Hub name (gpt2, distilgpt2, "
                        "gpt2-medium) or a save_pretrained folder; short for --set model.init_from=SOURCE")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after N optimizer steps (the LR schedule still follows the token target)")
    return p.parse_args(argv)


def overrides_of(args: argparse.Namespace) -> list[str]:
    """The --set items, with --cycles N and --init-from expanded in front of them (an explicit --set wins)
    and --mirror-dir after them (it wins over a --set checkpoint.mirror_dir)."""
    cycles = [] if args.cycles is None else [
        "plasticity.heads.enabled=true", "plasticity.heads.mode=cycle", f"plasticity.heads.cycles={args.cycles}"]
    # A JSON string is a YAML string: the source stays text whatever it looks like ("1e3", "null").
    source = [] if args.init_from is None else [f"model.init_from={json.dumps(args.init_from)}"]
    mirror = [] if args.mirror_dir is None else [f"checkpoint.mirror_dir={json.dumps(args.mirror_dir)}"]
    return cycles + source + args.overrides + mirror


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        # Imported here so `--help` answers without loading torch.
        from nemoe.config import load_config
        from nemoe.schema import RunPaths
        from nemoe.trainer import Trainer

        if args.max_steps is not None and args.max_steps < 1:
            raise UserError("--max-steps must be >= 1")
        config = args.config or ("pretrained.yaml" if args.init_from else None)
        # A run being resumed takes an imported model's shape from its own records (in the run
        # folder or the mirror), not from the source.
        resume = (Path(args.run_dir), args.run_name) if args.resume else None
        cfg = load_config(config, overrides_of(args), resume=resume)
        trainer = Trainer(cfg, RunPaths.of(Path(args.run_dir), args.run_name or cfg.name), resume=args.resume,
                          max_steps=args.max_steps, allow_config_change=args.allow_config_change)
        try:
            trainer.fit()
        finally:
            trainer.close()
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch" in sys.modules:   # leave a torchrun process group cleanly
            from nemoe.distributed import shutdown
            shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
