"""tools/evaluate.py and tools/generate.py against transformers, on one tiny exported checkpoint.

The checkpoint is a random tiny BLOOM written as TP=2 layer files (so loading merges shards),
exported with megatron.convert; the expected numbers come from transformers' BloomForCausalLM
on that export and from the tokenizer and .bin/.idx files read directly, not from our code.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from transformers import BloomForCausalLM
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from megatron.convert.to_hf import export_to_hf
from megatron.data.indexed_dataset import IndexedDatasetBuilder
from megatron.inference.generation import SamplingConfig, filter_logits

REPO = Path(__file__).resolve().parents[1]
SEQ = 32


def load_tool(name: str):
    """tools/NAME.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A TP=2 checkpoint and its export, French JSON lines and a Swahili .bin/.idx pair."""
    from test_convert_hf import random_model, tiny_config, write_checkpoint

    root = tmp_path_factory.mktemp("inference")
    cfg = tiny_config(num_layers=2, hidden=64, heads=4, seq=SEQ)
    write_checkpoint(random_model(cfg, seed=3), cfg, root / "ckpt", tp=2)
    export_to_hf(root / "ckpt", root / "hf", progress=False)
    tokenizer = Tokenizer.from_file(cfg.data.tokenizer)
    eos = tokenizer.token_to_id("</s>")

    def docs(lang):
        with gzip.open(REPO / "data" / "corpus" / "natural" / f"{lang}.jsonl.gz", "rt", encoding="utf-8") as f:
            return [json.loads(line)["text"] for line in f][:4]

    fr = root / "fr.jsonl"
    fr.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs("fr")), encoding="utf-8")
    fr_tokens = [tokenizer.encode(t, add_special_tokens=False).ids + [eos] for t in docs("fr")]
    sw_tokens = [tokenizer.encode(t, add_special_tokens=False).ids + [eos] for t in docs("sw")]
    with IndexedDatasetBuilder(root / "sw_text_document.bin", np.uint16) as builder:
        for doc in sw_tokens:
            builder.add_document(doc)
        builder.finalize(root / "sw_text_document.idx")
    return root, {"fr": fr_tokens, "sw": sw_tokens}


@pytest.fixture(scope="module")
def hf(setup):
    """transformers' model loaded from the export."""
    return BloomForCausalLM.from_pretrained(setup[0] / "hf").eval()


def transformers_loss(hf: BloomForCausalLM, documents: list[list[int]], max_windows: int) -> tuple[float, int]:
    """Mean next-token loss of transformers' model over Megatron-style windows of the stream."""
    stream = torch.tensor([t for doc in documents for t in doc])
    windows = min(max_windows, (len(stream) - 1) // SEQ)
    batch = torch.stack([stream[i * SEQ : i * SEQ + SEQ + 1] for i in range(windows)])
    with torch.no_grad():
        logits = hf(batch[:, :-1]).logits
    loss = F.cross_entropy(logits.flatten(0, 1).double(), batch[:, 1:].flatten())
    return loss.item(), batch[:, 1:].numel()


def test_evaluate_reports_transformers_perplexity_per_language(setup, hf, capsys):
    root, tokens = setup
    evaluate = load_tool("evaluate")
    for checkpoint in ("ckpt", "hf"):  # ours (TP=2 files, merged) and the transformers folder
        out = root / f"eval-{checkpoint}.json"
        args = ["--checkpoint", str(root / checkpoint), "--data", f"fr={root / 'fr.jsonl'}",
                "--data", str(root / "sw_text_document"), "--max-windows", "7", "--micro-batch-size", "3",
                "--seq-length", str(SEQ), "--output", str(out), "--quiet"]
        assert evaluate.main(args) == 0
        report = json.loads(out.read_text())
        assert set(report["languages"]) == {"fr", "sw"}
        for lang in ("fr", "sw"):
            expected, predicted = transformers_loss(hf, tokens[lang], 7)
            got = report["languages"][lang]
            assert got["tokens"] == predicted and got["windows"] == 7
            assert got["loss"] == pytest.approx(expected, abs=1e-5)
            assert got["ppl"] == pytest.approx(math.exp(expected), rel=1e-5)
        table = capsys.readouterr().out
        assert "fr " in table and "sw " in table and "perplexity" in table


def test_evaluate_errors_name_the_file(setup, capsys):
    root, _ = setup
    evaluate = load_tool("evaluate")
    assert evaluate.main(["--checkpoint", str(root / "missing"), "--data", str(root / "fr.jsonl")]) == 1
    assert "missing does not exist" in capsys.readouterr().err
    assert evaluate.main(["--checkpoint", str(root / "ckpt"), "--data", str(root / "nothing.txt")]) == 1
    assert "nothing.txt is neither a .bin/.idx prefix" in capsys.readouterr().err
    bad = root / "bad.jsonl"
    bad.write_text('{"content": "x"}\n')
    assert evaluate.main(["--checkpoint", str(root / "ckpt"), "--data", str(bad)]) == 1
    assert "bad.jsonl:1: no string field 'text'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main(["--checkpoint", "x", "--data", "y", "--micro-batch-size", "0"])
    assert exit_info.value.code == 2


def test_generate_greedy_equals_transformers_generate(setup, hf, capsys):
    root, _ = setup
    generate = load_tool("generate")
    prompts = ["Tous les êtres humains naissent", "人人生而自由"]
    out = root / "samples.json"
    args = ["--checkpoint", str(root / "ckpt"), "--max-new-tokens", "12", "--output", str(out), "--quiet"]
    for prompt in prompts:
        args += ["--prompt", prompt]
    assert generate.main(args) == 0
    records = json.loads(out.read_text())
    for record in records:
        ids = torch.tensor([record["prompt_ids"]])
        expected = hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:].tolist()
        assert record["new_ids"] == expected, record["prompt"]
    printed = capsys.readouterr().out
    assert all(repr(p) in printed for p in prompts)


def test_generate_sampling_is_seeded_and_top_k_one_is_greedy(setup, tmp_path):
    root, _ = setup
    generate = load_tool("generate")

    def run(*flags):
        out = tmp_path / "s.json"
        assert generate.main(["--checkpoint", str(root / "ckpt"), "--prompt", "Article 1.", "--max-new-tokens", "6",
                              "--output", str(out), "--quiet", *flags]) == 0
        return json.loads(out.read_text())[0]["new_ids"]

    assert run("--top-p", "0.9", "--seed", "5") == run("--top-p", "0.9", "--seed", "5")
    assert run("--top-k", "1", "--temperature", "0.7") == run("--greedy")


def test_sampling_filters_equal_transformers_warpers():
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(0)) * 3
    for temperature, k, p in [(0.7, 0, 1.0), (1.0, 20, 1.0), (1.3, 0, 0.8), (0.9, 50, 0.5)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits)
        if k:
            expected = TopKLogitsWarper(k)(None, expected)
        if p < 1.0:
            expected = TopPLogitsWarper(p)(None, expected)
        ours = filter_logits(logits, SamplingConfig(greedy=False, temperature=temperature, top_k=k, top_p=p))
        assert torch.equal(torch.isinf(ours), torch.isinf(expected)), (temperature, k, p)
        finite = ~torch.isinf(ours)
        assert torch.allclose(ours[finite], expected[finite]), (temperature, k, p)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
