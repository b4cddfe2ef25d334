#!/usr/bin/env python3
"""Universal-checkpoint conversion rate and memory, and what they mean for BLOOM-176B.

    python bench/universal_conversion.py --workdir /tmp/ucbench            # make the checkpoint, measure
    python bench/universal_conversion.py --workdir /tmp/ucbench --workers 1 2 --deepspeed 1

1. **The checkpoint** (skipped when ``--workdir`` already holds it): ``configs/tiny.yaml`` with
   ``--set`` overrides for a 183M-parameter BLOOM (6 layers, hidden 1536, vocab 8192) at TP2,
   fp32, ZeRO-1, trained one step on synthetic data with ``torchrun --nproc_per_node 2
   pretrain_bloom.py`` and saved: 3.6 GB (layer files, two ``mp_rank`` engine files with the
   model, two optimizer shards with fp32 weights and both Adam moments).
2. **Conversions**: ``tools/convert_checkpoint.py`` with each ``--workers`` count (and, with
   ``--deepspeed N``, DeepSpeed's own ``ds_to_universal`` with N workers), each in a fresh
   output folder, with the page cache dropped first when the script may (root). Measured: wall
   time, GB/s (source bytes / wall time), CPU seconds of all processes (GB per CPU second: what
   the extrapolation scales, as it depends little on the machine's load), the largest resident
   set of any one process
   (``/usr/bin/time -v``), and the largest total resident set of the whole process tree, sampled
   every 50 ms from ``/proc`` (workers run in parallel, so this is what the node must have).
3. **Extrapolation** to BLOOM-176B's 2.3 TB checkpoint next to BigScience's 47 min 55 s and
   65.7 GB on a 40-core node (see bench/README.md for the assumptions).

Writes ``bench/results/universal_conversion.json``. Needs about 3 x the checkpoint's size on disk.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from bench_record import drop_page_cache  # noqa: E402

PYTHON = sys.executable
OVERRIDES = ["model.num_layers=6", "model.hidden_size=1536", "model.num_attention_heads=16", "model.seq_length=32",
             "model.vocab_size=8192", "model.pad_vocab_size_to=8192", "parallel.tensor_model_parallel_size=2",
             "parallel.zero_stage=1", "training.bf16=false", "training.micro_batch_size=1",
             "training.global_batch_size=1", "training.train_samples=null", "training.train_iters=1",
             "optimizer.lr_warmup_samples=0", "optimizer.lr_decay_samples=null", "logging.eval_interval=0",
             "logging.log_interval=1", "logging.tensorboard_dir=null", "logging.sample_prompts=[]",
             "checkpoint.save_interval=null"]
# BLOOM-176B (configs/bloom-176b.yaml): the sizes that bound a converter's memory.
BLOOM_176B = {"checkpoint_bytes": 2.3e12, "hidden": 14336, "padded_vocab": 250880, "tp": 4, "pp": 12, "dp": 8,
              "bigscience_seconds": 47 * 60 + 55, "bigscience_rss_gb": 65.7, "bigscience_cores": 40}


def make_checkpoint(workdir: Path) -> Path:
    """Train the benchmark model one step at TP2 and save it; returns the ``global_step1`` folder."""
    import yaml

    from checkpoint_io import write_corpus

    target = workdir / "checkpoints" / "global_step1"
    if (target / "manifest.json").is_file():
        return target
    datasets = write_corpus(workdir / "data", 8192)
    config = workdir / "config.yaml"
    body = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    body["data"] = {"datasets": datasets, "split": "0.95,0.05,0", "num_workers": 0}
    body["checkpoint"] = {"save": str(workdir / "checkpoints"), "load": str(workdir / "checkpoints"), "keep_last": 1}
    body["logging"]["run_dir"] = str(workdir / "run")
    config.write_text(yaml.safe_dump(body))
    command = [PYTHON, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29731",
               str(REPO / "pretrain_bloom.py"), "--config", str(config)]
    for item in OVERRIDES:
        command += ["--set", item]
    print("making the checkpoint:", shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    return target


class TreeMemory:
    """Largest total RSS of a process and its descendants, sampled from /proc."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval, self.peak = pid, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    parent = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    continue
                children.setdefault(parent, []).append(int(entry))
        tree, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            tree.append(pid)
            todo += children.get(pid, [])
        return tree

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._tree():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
                total += int(match.group(1)) * 1024 if match else 0
            self.peak = max(self.peak, total)
            self._stop.wait(self.interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def measure(name: str, command: list[str], source_bytes: int) -> dict:
    """Run ``command`` under /usr/bin/time -v; wall time, rate, largest process RSS, tree RSS."""
    cold = drop_page_cache()
    print(f"{name}: {shlex.join(command)}", flush=True)
    start = time.perf_counter()
    process = subprocess.Popen(["/usr/bin/time", "-v", *command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    tree = TreeMemory(process.pid)
    stdout, stderr = process.communicate()
    seconds = time.perf_counter() - start
    tree_peak = tree.stop()
    if process.returncode != 0:
        raise SystemExit(f"{name} failed ({process.returncode}):\n{stdout[-3000:]}\n{stderr[-3000:]}")
    max_rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", stderr).group(1)) * 1024
    # CPU seconds of the whole tree (workers included): on a shared machine the wall time depends on
    # the load, the CPU time much less, so the extrapolation uses it.
    cpu = sum(float(re.search(rf"{kind} time \(seconds\): ([\d.]+)", stderr).group(1)) for kind in ("User", "System"))
    phases = re.findall(r"universal conversion: (\w+) took ([\d.]+) s", stdout)
    result = {"name": name, "command": shlex.join(["python", *command[1:]]), "cold_cache": cold,
              "seconds": round(seconds, 2),
              "gb_per_s": round(source_bytes / 1e9 / seconds, 4), "cpu_seconds": round(cpu, 1),
              "gb_per_cpu_second": round(source_bytes / 1e9 / cpu, 4), "max_process_rss_gb": round(max_rss / 1e9, 3),
              "max_tree_rss_gb": round(tree_peak / 1e9, 3), "phases": {k: float(v) for k, v in phases}}
    print(json.dumps(result), flush=True)
    return result


def bloom_176b_memory_bound() -> dict:
    """What one worker holds at most for BLOOM-176B, from its largest tensors (fp32 states).

    Extract: a fragment is one parameter's part of one DP partition of a stage's flat buffer, so
    at most min(the parameter's TP slice, the partition); the worker holds its copy and, until
    they are dropped, the mapped pages it was copied from. Merge: one state's fragments plus their
    concatenation."""
    b = BLOOM_176B
    h, v, tp, pp, dp = b["hidden"], b["padded_vocab"], b["tp"], b["pp"], b["dp"]
    layers = 70
    embedding_state = v * h * 4  # one fp32 state of the word embeddings, the largest parameter
    block_state = 4 * h * h * 4  # one fp32 state of dense_h_to_4h / dense_4h_to_h
    # The first stage's flat buffer on one TP rank: the embedding slice and its share of the blocks.
    stage_elements = (v * h + layers * 12 * h * h / pp) / tp
    partition_bytes = stage_elements / dp * 4
    largest_embedding_fragment = min(embedding_state / tp, partition_bytes)
    largest_block_fragment = min(block_state / tp, partition_bytes)
    return {"embedding_state_gb": embedding_state / 1e9, "block_state_gb": block_state / 1e9,
            "merge_worker_embedding_gb": 2 * embedding_state / 1e9, "merge_worker_block_gb": 2 * block_state / 1e9,
            "extract_worker_embedding_gb": 2 * largest_embedding_fragment / 1e9,
            "extract_worker_block_gb": 2 * largest_block_fragment / 1e9}


def main() -> None:
    """Make the checkpoint if needed, convert it with each setting, write the JSON."""
    from bench_record import describe_machine, write_result

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="where the checkpoint and conversions go (several GB)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--deepspeed", type=int, nargs="*", default=[],
                        help="also time DeepSpeed's ds_to_universal with these worker counts")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint and outputs")
    args = parser.parse_args()
    workdir = Path(args.workdir)
    machine = describe_machine()
    source = make_checkpoint(workdir)
    source_bytes = sum(p.stat().st_size for p in source.iterdir() if p.is_file())
    print(f"checkpoint {source}: {source_bytes / 1e9:.2f} GB", flush=True)
    runs = []
    for workers in args.workers:
        out = workdir / f"ours-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        runs.append(measure(f"convert_checkpoint --workers {workers}",
                            [PYTHON, "tools/convert_checkpoint.py", str(source), "--output", str(out / "u"),
                             "--workers", str(workers)], source_bytes))
        shutil.rmtree(out, ignore_errors=True)
    for workers in args.deepspeed:
        out = workdir / f"deepspeed-{workers}"
        shutil.rmtree(out, ignore_errors=True)
        runs.append(measure(f"ds_to_universal workers {workers}",
                            [PYTHON, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(source),
                             "--output_folder", str(out / "u"), "--num_extract_workers", str(workers),
                             "--num_merge_workers", str(workers)], source_bytes))
        shutil.rmtree(out, ignore_errors=True)
    result = {"what": "universal checkpoint conversion", "command": shlex.join(["python", *sys.argv]),
              "checkpoint": {"path": str(source), "bytes": source_bytes, "overrides": OVERRIDES}, "runs": runs,
              "bloom_176b": {**BLOOM_176B, "memory_bound": bloom_176b_memory_bound()}, "machine": machine}
    write_result(REPO / "bench" / "results" / "universal_conversion.json", result)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
