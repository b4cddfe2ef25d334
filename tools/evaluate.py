#!/usr/bin/env python3
"""Per-language loss and perplexity of any checkpoint on held-out data: a table and a JSON report.

    python tools/evaluate.py --checkpoint runs/tiny/checkpoints \\
        --data fr=data/heldout/fr_text_document --data sw=heldout/sw.jsonl.gz --output eval.json

``--checkpoint`` is one of our save roots or ``global_stepN`` folders (any TP x PP x DP layout,
any ZeRO stage), a folder of bare layer files, or a transformers BLOOM folder. Each ``--data``
is ``NAME=PATH`` (or ``PATH``, named after the file): a ``.bin/.idx`` prefix, or JSON lines
(``.jsonl``/``.json``, optionally gzip'd) whose ``--json-key`` field is tokenized here with the
checkpoint's tokenizer, an end-of-document token after each document.

The stream of each language is cut into windows of ``seq_length + 1`` tokens overlapping by
one (Megatron's samples, unshuffled; the last partial window is left out), so every token after
the first is predicted once; the loss is the mean next-token cross entropy over those tokens
and the perplexity its exponential (megatron/inference/evaluation.py).

Parallelism: launch several processes, e.g.
    torchrun --nproc-per-node 4 tools/evaluate.py --tensor-model-parallel-size 2 ...
runs TP=2 x DP=2 (the checkpoint is re-split for TP=2 whatever layout saved it; windows are
shared out over DP). --pipeline-model-parallel-size P splits the layers into P stages run by
DeepSpeed's pipeline engine (one of our checkpoints; each DP rank then evaluates whole
micro-batches only, so up to micro-batch x DP - 1 trailing windows per language are left out).
A GPU is used when there is one (LOCAL_RANK's).

Exit status: 0 on success, 1 when the checkpoint, config or data cannot be used (the message
says what to fix), 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

try:
    from megatron.utils.terminal import show_progress
except ImportError:  # run as a script from a checkout that is not pip-installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from megatron.utils.terminal import show_progress
from megatron.errors import process_rank, reports_errors  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line arguments (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="save root, global_stepN folder, layer-file folder or transformers BLOOM folder")
    parser.add_argument("--step", type=int, default=None, help="evaluate global_step{STEP} (default: 'latest')")
    parser.add_argument("--config", default=None,
                        help="the run's YAML config (default: the one found with the checkpoint)")
    parser.add_argument("--data", action="append", required=True, metavar="[NAME=]PATH",
                        help="held-out data of one language: a .bin/.idx prefix or a JSON lines file (repeatable)")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json for JSON lines data (default: the checkpoint's)")
    parser.add_argument("--json-key", default="text", help="field of each JSON line holding the text (default: text)")
    parser.add_argument("--seq-length", type=int, default=None,
                        help="tokens of context per window (default: the model's model.seq_length)")
    parser.add_argument("--micro-batch-size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--max-windows", type=int, default=None,
                        help="evaluate at most this many windows per language (default: all)")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1,
                        help="TP size; the processes launched (torchrun) must be a multiple of it (default 1)")
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                        help="PP size: the model's layers split into this many stages, run by DeepSpeed's pipeline "
                             "engine (our checkpoints only; default 1)")
    parser.add_argument("--output", default=None, help="write the JSON report here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (none either off a terminal)")
    args = parser.parse_args(argv)
    for name in ("micro_batch_size", "tensor_model_parallel_size", "pipeline_model_parallel_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.max_windows is not None and args.max_windows < 1:
        parser.error("--max-windows must be at least 1")
    return args


def evaluate(args: argparse.Namespace) -> dict:
    """Load, evaluate every source, print the table on rank 0; returns the JSON report."""
    from tqdm import tqdm

    from megatron.core.distributed import shutdown_distributed
    from megatron.data.tokenizer import load_tokenizer
    from megatron.inference.evaluation import (
        EvaluationDataError,
        evaluate_windows,
        format_table,
        make_windows,
        parse_data_source,
        results_json,
        token_stream,
    )
    from megatron.inference.loading import (
        inference_device,
        inference_parallel_state,
        load_for_inference,
        load_pipeline_for_evaluation,
    )

    sources = [parse_data_source(spec) for spec in args.data]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise EvaluationDataError(f"--data names {names} repeat a name: give each NAME=PATH a different NAME")
    parallel, distributed = inference_parallel_state(args.tensor_model_parallel_size,
                                                     args.pipeline_model_parallel_size)
    try:
        rank0 = parallel.rank == 0
        device = inference_device()
        if parallel.pp_enabled:
            loaded = load_pipeline_for_evaluation(args.checkpoint, parallel, args.micro_batch_size,
                                                  config=args.config, step=args.step, device=device)
            loss_fn, vocab = loaded.loss, loaded.cfg.padded_vocab_size
        else:
            loaded = load_for_inference(args.checkpoint, parallel, config=args.config, step=args.step,
                                        device=device, progress=rank0 and show_progress(args.quiet))
            model, vocab = loaded.model, loaded.model.padded_vocab_size

            def loss_fn(inputs, labels):
                return model(inputs, labels=labels)

        seq_length = args.seq_length or loaded.cfg.model.seq_length
        tokenizer_path = args.tokenizer or loaded.tokenizer
        needs_tokenizer = any(s.kind == "jsonl" for s in sources)
        tokenizer = load_tokenizer(tokenizer_path) if needs_tokenizer and tokenizer_path else None
        windows = {}
        for source in sources:
            windows[source.name] = make_windows(token_stream(source, tokenizer, args.json_key), seq_length,
                                                args.max_windows)
            if len(windows[source.name]) == 0:
                raise EvaluationDataError(f"{source.path} holds fewer than {seq_length + 1} tokens: no window to "
                                          "evaluate (use more data or a smaller --seq-length)")
            if parallel.pp_enabled:
                # The pipeline engine runs fixed-shape micro-batches: whole ones on every DP rank.
                unit = args.micro_batch_size * parallel.dp_size
                windows[source.name] = windows[source.name][: len(windows[source.name]) // unit * unit]
                if len(windows[source.name]) == 0:
                    raise EvaluationDataError(f"{source.path}: fewer windows than --micro-batch-size x data-parallel "
                                              f"size = {unit}: use more data or a smaller --micro-batch-size")
            top = int(windows[source.name].max())
            if top >= vocab:
                raise EvaluationDataError(f"{source.path} holds token id {top} but the model's vocabulary has {vocab} "
                                          "rows: the data was tokenized with another tokenizer")
        total = sum(len(w) for w in windows.values())
        bar = tqdm(total=total, desc="evaluate", unit="window", disable=not (rank0 and show_progress(args.quiet)),
                   dynamic_ncols=True)
        results = {}
        for name, w in windows.items():
            results[name] = evaluate_windows(loss_fn, w, args.micro_batch_size, parallel, device,
                                             progress=bar.update if rank0 else None)
            # Off a terminal, one plain line per language instead of a bar.
            if rank0 and bar.disable:
                print(f"evaluated {name}: {results[name].tokens:,} tokens", flush=True)
        bar.close()
        report = results_json(results, sources, checkpoint=str(args.checkpoint),
                              checkpoint_dir=str(loaded.checkpoint_dir), step=loaded.step, source=loaded.source,
                              seq_length=seq_length,
                              layout={"tp": parallel.tp_size, "pp": parallel.pp_size, "dp": parallel.dp_size})
        if rank0:
            step = f" at step {loaded.step}" if loaded.step is not None else ""
            print(f"{loaded.checkpoint_dir}{step} ({loaded.source}), seq_length {seq_length}, "
                  f"TP={parallel.tp_size} PP={parallel.pp_size} DP={parallel.dp_size}:")
            print(format_table(results), flush=True)
        return report
    finally:
        if distributed:
            shutdown_distributed()


@reports_errors("evaluate")
def main(argv: Sequence[str] | None = None) -> int:
    """Run the evaluation; returns the exit status. Expected errors (a missing checkpoint, bad data or options) end
    it with one message from rank 0 and a non-zero status."""
    args = parse_args(argv)
    report = evaluate(args)
    if args.output and process_rank() == 0:
        from megatron.utils.atomic import atomic_write_text

        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(Path(args.output), json.dumps(report, indent=1) + "\n")
        print(f"report: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
