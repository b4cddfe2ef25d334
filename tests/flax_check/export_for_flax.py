#!/usr/bin/env python
"""First half of ``make test-flax`` (runs in the main venv): export checkpoints for the Flax venv.

    python tests/flax_check/export_for_flax.py OUT_DIR

Writes into OUT_DIR:
  trained-hf/      the trained tiny checkpoint of tests/fixtures/legacy_checkpoint (3 steps of our
                   trainer; 4 heads) exported with megatron.convert.to_hf (fp32);
  trained.npz      ``tokens`` [2, 24] and our model's ``logits`` on them, from that checkpoint
                   loaded by megatron.inference.loading (fp32);
  heads6-hf/       a random tiny model with 6 heads (non-power-of-two ALiBi slopes), exported, to
                   show transformers' Flax BLOOM bug on such head counts.
Exit status 0, or 1 with the reason.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from megatron.checkpoint.layer_files import save_layer_files  # noqa: E402
from megatron.config import Config, ModelConfig, save_config  # noqa: E402
from megatron.convert.to_hf import export_to_hf  # noqa: E402
from megatron.core.parallel_state import ParallelState  # noqa: E402
from megatron.inference.loading import load_for_inference  # noqa: E402
from megatron.model.bloom import build_model  # noqa: E402

TRAINED = REPO / "tests" / "fixtures" / "legacy_checkpoint" / "checkpoints"


def main() -> int:
    """Write the exports and our logits (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="folder to write (replaced)")
    out = Path(parser.parse_args().out_dir)
    # These tiny models have no tokenizer; the Flax check compares logits on token ids only.
    warnings.filterwarnings("ignore", message="no tokenizer given")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)

    export_to_hf(TRAINED, out / "trained-hf", dtype="fp32", progress=False)
    loaded = load_for_inference(TRAINED, ParallelState.single())
    tokens = torch.randint(0, loaded.cfg.model.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = loaded.model(tokens)[..., : loaded.cfg.model.vocab_size]
    np.savez(out / "trained.npz", tokens=tokens.numpy(), logits=logits.double().numpy())
    heads = loaded.cfg.model.num_attention_heads
    print(f"exported {TRAINED} (step {loaded.step}, {heads} heads) to {out / 'trained-hf'}; our logits: trained.npz")

    cfg = Config()
    cfg.model = ModelConfig(num_layers=2, hidden_size=48, num_attention_heads=6, vocab_size=256, seq_length=32,
                            init_method_std=0.05)
    cfg.training.train_iters = 1
    with tempfile.TemporaryDirectory() as tmp:
        save_layer_files(build_model(cfg.model, seed=1), Path(tmp) / "global_step1")
        save_config(cfg, Path(tmp) / "config.yaml")
        export_to_hf(Path(tmp) / "global_step1", out / "heads6-hf", progress=False)
    print(f"exported a random 6-head model to {out / 'heads6-hf'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
