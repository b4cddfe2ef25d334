#!/usr/bin/env python
"""Second half of ``make test-flax`` (runs in .venv-flax: transformers 4.46.x, jax CPU, flax):
load our exports into transformers' Flax BLOOM classes and compare with our logits.

    python tests/flax_check/compare_flax.py OUT_DIR      # OUT_DIR written by export_for_flax.py

FlaxBloomForCausalLM and FlaxBloomModel load OUT_DIR/trained-hf with ``from_pt=True``. The
causal LM's logits, and the base model's last hidden state through the tied embedding (BLOOM's
head), must equal ours (trained.npz) within 1e-5 in fp32; the largest differences are printed.

transformers' Flax BLOOM cannot run a model whose head count is not a power of two (6 here;
BLOOM-176B's 112): its ALiBi code calls ``jnp.cat``, which jax does not have, an upstream bug in
transformers' modeling_flax_bloom.py ``build_alibi_tensor``. The check runs the 6-head export
to show whether the installed version still has the bug, and says so; that part never fails it.

Exit status: 0 when both classes match, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TOLERANCE = 1e-5


def main() -> int:
    """Compare and report (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", help="the folder export_for_flax.py wrote")
    out = Path(parser.parse_args().out_dir)

    import jax
    import numpy as np
    import transformers
    from transformers import FlaxBloomForCausalLM, FlaxBloomModel

    jax.config.update("jax_enable_x64", False)
    print(f"transformers {transformers.__version__}, jax {jax.__version__} ({jax.default_backend()})")
    ours = np.load(out / "trained.npz")
    tokens, expected = ours["tokens"], ours["logits"]

    causal = FlaxBloomForCausalLM.from_pretrained(out / "trained-hf", from_pt=True, dtype="float32")
    logits = np.asarray(causal(tokens).logits, dtype=np.float64)[..., : expected.shape[-1]]
    diff_causal = float(np.abs(logits - expected).max())

    base = FlaxBloomModel.from_pretrained(out / "trained-hf", from_pt=True, dtype="float32")
    hidden = np.asarray(base(tokens).last_hidden_state, dtype=np.float64)
    embedding = np.asarray(base.params["word_embeddings"]["embedding"], dtype=np.float64)
    diff_base = float(np.abs(hidden @ embedding.T[:, : expected.shape[-1]] - expected).max())

    ok = True
    for name, diff in (("FlaxBloomForCausalLM", diff_causal), ("FlaxBloomModel (hidden @ tied embedding)", diff_base)):
        verdict = "ok" if diff <= TOLERANCE else "FAIL"
        ok &= diff <= TOLERANCE
        print(f"{name}: max |logits - ours| = {diff:.3e} (tolerance {TOLERANCE:g}) {verdict}")

    try:
        six = FlaxBloomForCausalLM.from_pretrained(out / "heads6-hf", from_pt=True, dtype="float32")
        six(tokens % six.config.vocab_size)
        print("6 heads (not a power of two): runs in this transformers version; the upstream jnp.cat bug is fixed")
    except AttributeError as err:
        print(f"6 heads (not a power of two): transformers' Flax BLOOM fails ({err}): upstream bug, its ALiBi "
              "code (modeling_flax_bloom.build_alibi_tensor) calls jnp.cat, which jax does not have; this check "
              "uses 4 heads. Our model and the PyTorch classes handle any head count.")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
