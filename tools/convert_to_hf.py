#!/usr/bin/env python3
"""Export a checkpoint of this framework to a Hugging Face transformers BLOOM folder.

    python tools/convert_to_hf.py --checkpoint checkpoints/bloom-560m --output exports/bloom-560m \\
        --dtype bf16 --tokenizer data/tokenizers/bloom/tokenizer.json

``--checkpoint`` is a save root (``latest``, or ``--step N``, picks the tag) or one
``global_stepN`` folder. Any tensor/pipeline-parallel layout and ZeRO stage works: only the
``layer_XX-model_YY-model_states.pt`` files are read (as in BLOOM's published training
checkpoints), one layer at a time, so memory stays near one layer's size. The model's shape
comes from ``--config`` (our YAML), else from a ``config.yaml`` in or next to the checkpoint, or
the config recorded in the checkpoint (``manifest.json``, DeepSpeed's client state).

The output holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards
of at most ``--max-shard-size`` plus ``model.safetensors.index.json``; the head is tied to the
embedding and not stored twice) and, with a tokenizer, ``tokenizer.json``,
``tokenizer_config.json`` and ``special_tokens_map.json``. It loads with
``transformers.BloomForCausalLM.from_pretrained(OUTPUT)`` (and ``AutoTokenizer``). It is written
to ``OUTPUT.tmp`` and renamed when complete.

Exit status: 0 on success, 1 on a conversion error (the message says what to check), 2 on bad
arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Sequence

try:
    from megatron.errors import ConversionError
    from megatron.utils.terminal import show_progress
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron.errors import ConversionError
    from megatron.utils.terminal import show_progress


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="save root or global_stepN folder")
    parser.add_argument("--step", type=int, default=None, help="export global_step{STEP} (default: 'latest')")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="dtype of the exported weights (default: as stored in the checkpoint)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors file (default 5GB)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json to ship (default: the config's data.tokenizer if it exists)")
    parser.add_argument("--config", default=None, help="the run's YAML config (default: the config found with "
                                                       "the checkpoint)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT once done")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (none either off a terminal)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the export; returns the exit status."""
    args = parse_args(argv)
    from megatron.config import ConfigError
    from megatron.convert.to_hf import export_to_hf

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda message, *_, **__: print(f"convert_to_hf: warning: {message}",
                                                                  file=sys.stderr)
            summary = export_to_hf(args.checkpoint, args.output, step=args.step, dtype=args.dtype,
                                   max_shard_size=args.max_shard_size, tokenizer=args.tokenizer,
                                   config=args.config, overwrite=args.overwrite, progress=show_progress(args.quiet))
    except KeyboardInterrupt:
        print("convert_to_hf: interrupted; no output was kept", file=sys.stderr)
        return 130
    except (ConversionError, ConfigError, ValueError, OSError) as err:
        print(f"convert_to_hf: error: {err}", file=sys.stderr)
        return 1
    print(f"exported {summary.checkpoint_dir} (TP={summary.tp_size}, {summary.num_layers} layers, "
          f"{summary.num_parameters:,} parameters, {str(summary.dtype).removeprefix('torch.')}) to {summary.output} "
          f"in {summary.seconds:.1f} s; config from {summary.config_source}")
    print("files: " + ", ".join(summary.files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
