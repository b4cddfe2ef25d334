#!/usr/bin/env python3
"""Import a Hugging Face transformers BLOOM folder as a checkpoint of this framework.

    python tools/convert_from_hf.py --hf bloom-560m --output checkpoints/bloom-560m-import \\
        --tp 2 --pp 2 --base-config configs/bloom-560m.yaml

``--hf`` is a folder with ``config.json`` (``model_type: bloom``) and the weights:
``model.safetensors`` or ``pytorch_model.bin``, whole or sharded with a ``*.index.json``
(``.bin`` files are loaded with ``weights_only=True``). Any BLOOM size works; tensors are read
one at a time and each layer is written, then freed.

The output is a checkpoint root:

    OUTPUT/global_step{STEP}/layer_XX-model_YY-model_states.pt   every layer at tensor-parallel size TP
    OUTPUT/latest                                                 naming global_step{STEP}
    OUTPUT/config.yaml                                            model shape from config.json,
                                                                  parallel.{tensor,pipeline}_model_parallel_size,
                                                                  checkpoint.load = OUTPUT; the other
                                                                  sections from --base-config
    OUTPUT/tokenizer.json                                         copied when the folder has one

Layer files are per pipeline layer, so --pp changes no file; it is recorded in config.yaml.
The output is written to ``OUTPUT.tmp`` and renamed when complete.

Exit status: 0 on success, 1 on a conversion error (the message says what to check), 2 on bad
arguments, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import sys
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
    parser.add_argument("--hf", required=True, help="transformers BLOOM folder (config.json + weights)")
    parser.add_argument("--output", required=True, help="checkpoint root to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the layer files (default 1)")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel size recorded in config.yaml")
    parser.add_argument("--step", type=int, default=0, help="iteration to tag the checkpoint with (default 0)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                        help="dtype of the written weights (default: as stored in the folder)")
    parser.add_argument("--base-config", default=None,
                        help="our YAML config whose training/optimizer/data sections config.yaml keeps")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUTPUT once done")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (none either off a terminal)")
    args = parser.parse_args(argv)
    if args.tp < 1 or args.pp < 1 or args.step < 0:
        parser.error("--tp and --pp must be >= 1 and --step >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the import; returns the exit status."""
    args = parse_args(argv)
    from megatron.config import ConfigError
    from megatron.convert.from_hf import import_from_hf

    try:
        summary = import_from_hf(args.hf, args.output, tp=args.tp, pp=args.pp, step=args.step, dtype=args.dtype,
                                 base_config=args.base_config, overwrite=args.overwrite,
                                 progress=show_progress(args.quiet))
    except KeyboardInterrupt:
        print("convert_from_hf: interrupted; no output was kept", file=sys.stderr)
        return 130
    except (ConversionError, ConfigError, ValueError, OSError) as err:
        print(f"convert_from_hf: error: {err}", file=sys.stderr)
        return 1
    print(f"imported {args.hf} ({summary.num_layers} layers, {summary.num_parameters:,} parameters, "
          f"{str(summary.dtype).removeprefix('torch.')}) to {summary.checkpoint_dir} at TP={summary.tp_size} "
          f"(PP={summary.pp_size} recorded in {summary.output / 'config.yaml'}) in {summary.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
