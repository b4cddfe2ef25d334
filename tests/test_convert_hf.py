"""Export to and import from transformers BLOOM (fp32, tiny models, one process).

Layer files here are cut from a single-device model by the checkpoint contract itself (written
out in ``contract_layer_files``, independently of megatron.convert); files from a real
multi-rank training run are covered in test_convert_distributed.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    BloomForQuestionAnswering,
    BloomForSequenceClassification,
    BloomForTokenClassification,
    BloomModel,
)

from megatron.checkpoint.layer_files import load_layer_files_into
from megatron.config import Config, ModelConfig, save_config
from megatron.convert.from_hf import import_from_hf
from megatron.convert.hf_mapping import hf_to_ours_state_dict
from megatron.convert.to_hf import export_to_hf, resolve_config
from megatron.data.tokenizer import load_tokenizer
from megatron.errors import ConversionError
from megatron.model.bloom import build_model

REPO = Path(__file__).resolve().parents[1]
TOKENIZER = REPO / "tests" / "fixtures" / "bloom-bpe-4k" / "tokenizer.json"
SPLIT_DIM0 = {"word_embeddings.weight", "self_attention.query_key_value.weight", "self_attention.query_key_value.bias",
              "mlp.dense_h_to_4h.weight", "mlp.dense_h_to_4h.bias"}
SPLIT_DIM1 = {"self_attention.dense.weight", "mlp.dense_4h_to_h.weight"}


def tiny_config(num_layers=3, hidden=96, heads=6, vocab=4096, seq=32) -> Config:
    """A run config for a tiny BLOOM (6 heads: non-power-of-two ALiBi slopes) with the 4k tokenizer."""
    cfg = Config()
    cfg.model = ModelConfig(num_layers=num_layers, hidden_size=hidden, num_attention_heads=heads, vocab_size=vocab,
                            seq_length=seq, init_method_std=0.05)
    cfg.training.train_iters = 1
    cfg.data.tokenizer = str(TOKENIZER)
    return cfg


def random_model(cfg: Config, seed: int = 0):
    """Our single-device model with non-trivial LayerNorms and biases."""
    model = build_model(cfg.model, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def contract_layer_files(model, directory: Path, tp: int) -> None:
    """Write ``model`` as layer files at TP size ``tp`` exactly as the checkpoint contract says."""
    state, layers = model.state_dict(), model.cfg.num_layers
    by_index: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in state.items():
        if name.startswith("embedding."):
            index, key = 1, name[len("embedding."):]
        elif name.startswith("final_layernorm."):
            index, key = layers + 4, name[len("final_layernorm."):]
        else:
            _, number, key = name.split(".", 2)
            index = int(number) + 3
        by_index.setdefault(index, {})[key] = tensor
    directory.mkdir(parents=True, exist_ok=True)
    for index, tensors in by_index.items():
        for rank in range(tp):
            shard = {}
            for key, tensor in tensors.items():
                dim = 0 if key in SPLIT_DIM0 else 1 if key in SPLIT_DIM1 else None
                shard[key] = tensor.clone() if dim is None else tensor.chunk(tp, dim)[rank].clone()
            torch.save(shard, directory / f"layer_{index:02d}-model_{rank:02d}-model_states.pt")


def write_checkpoint(model, cfg: Config, root: Path, tp: int, step: int = 10) -> Path:
    """A save root with global_step{step} layer files, ``latest`` and ``config.yaml``."""
    contract_layer_files(model, root / f"global_step{step}", tp)
    (root / "latest").write_text(f"global_step{step}")
    save_config(cfg, root / "config.yaml")
    return root


def random_hf_model(vocab=256, hidden=64, layers=2, heads=4, seed=0) -> BloomForCausalLM:
    """transformers' BLOOM with random, non-trivial weights."""
    torch.manual_seed(seed)
    model = BloomForCausalLM(BloomConfig(vocab_size=vocab, hidden_size=hidden, n_layer=layers, n_head=heads,
                                         initializer_range=0.05, bos_token_id=1, eos_token_id=2, pad_token_id=3))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def safetensors_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of an exported folder, whatever its sharding."""
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A TP=2 checkpoint of a random tiny model, exported to transformers (fp32)."""
    root = tmp_path_factory.mktemp("export")
    cfg = tiny_config()
    model = random_model(cfg)
    write_checkpoint(model, cfg, root / "ckpt", tp=2)
    summary = export_to_hf(root / "ckpt", root / "hf", progress=False)
    return cfg, model, root, summary


def test_export_gives_our_logits_in_transformers(exported):
    cfg, model, root, summary = exported
    assert summary.tp_size == 2 and summary.num_layers == 3 and summary.config_source.endswith("config.yaml")
    assert not (root / "hf.tmp").exists()
    hf, info = BloomForCausalLM.from_pretrained(root / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert hf.lm_head.weight.data_ptr() == hf.transformer.word_embeddings.weight.data_ptr()  # tied
    assert "lm_head.weight" not in safetensors_dict(root / "hf")
    tokens = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.seq_length))
    with torch.no_grad():
        diff = (hf.eval()(tokens).logits - model(tokens)).abs().max().item()
    assert diff <= 1e-5, diff
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["architectures"] == ["BloomForCausalLM"] and config["model_type"] == "bloom"
    assert (config["vocab_size"], config["hidden_size"], config["n_layer"], config["n_head"]) == (4096, 96, 3, 6)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert config["torch_dtype"] == config["dtype"] == "float32"
    assert not config["apply_residual_connection_post_layernorm"]


@pytest.mark.parametrize("cls, head", [(BloomModel, set()), (BloomForSequenceClassification, {"score.weight"}),
                                       (BloomForTokenClassification, {"classifier.weight", "classifier.bias"}),
                                       (BloomForQuestionAnswering, {"qa_outputs.weight", "qa_outputs.bias"})],
                         ids=lambda v: getattr(v, "__name__", ""))
def test_export_loads_into_every_bloom_head(exported, cls, head):
    cfg, model, root, _ = exported
    loaded, info = cls.from_pretrained(root / "hf", output_loading_info=True)
    assert set(info["missing_keys"]) <= head, info  # only the task head is new
    assert not info["unexpected_keys"] or cls is not BloomModel or info["unexpected_keys"] <= {"lm_head.weight"}
    base = loaded if cls is BloomModel else loaded.transformer
    assert torch.equal(base.word_embeddings.weight, model.embedding.word_embeddings.weight)
    assert torch.equal(base.h[2].mlp.dense_4h_to_h.weight, model.layers[2].mlp.dense_4h_to_h.weight)


def test_exported_tokenizer_loads_offline_and_agrees(exported, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, root, _ = exported
    tokenizer = AutoTokenizer.from_pretrained(root / "hf")
    ours = load_tokenizer(TOKENIZER)
    text = "Article 1. All human beings are born free — 人人生而自由. def __init__(self):"
    assert tokenizer(text)["input_ids"] == ours.encode(text)
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id)
    assert ids == (1, 2, 3, 0)
    config = json.loads((root / "hf" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "BloomTokenizerFast"


def test_transformers_generate_equals_our_greedy_generation(exported):
    cfg, model, root, _ = exported
    hf = BloomForCausalLM.from_pretrained(root / "hf").eval()
    for seed in range(3):
        prompt = torch.randint(4, cfg.model.vocab_size, (1, 6), generator=torch.Generator().manual_seed(seed))
        ours = model.generate_greedy(prompt, max_new_tokens=12, eos_id=2)
        theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False)
        assert torch.equal(ours, theirs), (ours, theirs)


def test_sharded_bf16_export(exported):
    cfg, model, root, _ = exported
    summary = export_to_hf(root / "ckpt", root / "hf-bf16", dtype="bf16", max_shard_size="200KB", progress=False)
    index = json.loads((root / "hf-bf16" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all((root / "hf-bf16" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == summary.total_bytes
    full, half = safetensors_dict(root / "hf"), safetensors_dict(root / "hf-bf16")
    assert set(full) == set(half) == set(index["weight_map"])
    for name, tensor in full.items():
        assert half[name].dtype == torch.bfloat16 and torch.equal(half[name], tensor.to(torch.bfloat16)), name
    assert json.loads((root / "hf-bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    hf = BloomForCausalLM.from_pretrained(root / "hf-bf16")
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.transformer.h[0].self_attention.query_key_value.weight,
                       model.layers[0].self_attention.query_key_value.weight.to(torch.bfloat16))


def test_hf_to_ours_to_hf_round_trip_is_identical(tmp_path):
    hf = random_hf_model()
    hf.save_pretrained(tmp_path / "src")
    import_from_hf(tmp_path / "src", tmp_path / "ours", tp=2, pp=2, progress=False)
    with pytest.warns(UserWarning, match="no tokenizer given"):
        export_to_hf(tmp_path / "ours", tmp_path / "back", progress=False)
    source, back = safetensors_dict(tmp_path / "src"), safetensors_dict(tmp_path / "back")
    assert set(source) == set(back)
    for name in source:
        assert torch.equal(source[name], back[name]), name
    original = json.loads((tmp_path / "src" / "config.json").read_text())
    returned = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("vocab_size", "hidden_size", "n_layer", "n_head", "layer_norm_epsilon", "initializer_range",
                "bos_token_id", "eos_token_id", "pad_token_id"):
        assert returned[key] == original[key], key


def test_import_writes_a_trainable_checkpoint(tmp_path):
    from megatron.config import load_config

    hf = random_hf_model(vocab=4096, hidden=96, heads=6, layers=3)
    hf.save_pretrained(tmp_path / "src")
    shutil.copy(TOKENIZER, tmp_path / "src" / "tokenizer.json")
    summary = import_from_hf(tmp_path / "src", tmp_path / "ours", tp=2, pp=2, step=250,
                             base_config=REPO / "configs" / "tiny.yaml", progress=False)
    out = tmp_path / "ours"
    assert (out / "latest").read_text() == "global_step250"
    assert len(list((out / "global_step250").glob("layer_*-model_*-model_states.pt"))) == (3 + 2) * 2
    cfg = load_config(out / "config.yaml")
    assert (cfg.parallel.tensor_model_parallel_size, cfg.parallel.pipeline_model_parallel_size) == (2, 2)
    m = cfg.model
    shape = (m.num_layers, m.hidden_size, m.num_attention_heads, m.vocab_size, cfg.padded_vocab_size)
    assert shape == (3, 96, 6, 4096, 4096)
    assert cfg.checkpoint.load == str(out) and cfg.data.tokenizer == str(out / "tokenizer.json")
    assert cfg.optimizer.lr == load_config(REPO / "configs" / "tiny.yaml").optimizer.lr  # from the base config
    assert summary.num_parameters == sum(p.numel() for p in hf.parameters())  # tied head counted once
    # The TP=2 files fill a single-device model (TP merge) that equals transformers.
    model = build_model(cfg.model, cfg.padded_vocab_size)
    load_layer_files_into(model, out, None, 3)
    expected = hf_to_ours_state_dict(hf.state_dict())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name


def test_import_reads_sharded_pytorch_bin(tmp_path):
    hf = random_hf_model()
    state = {k: v.clone() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    names = sorted(state)
    (tmp_path / "src").mkdir()
    weight_map = {}
    for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: state[n] for n in part}, tmp_path / "src" / file)
        weight_map.update({n: file for n in part})
    (tmp_path / "src" / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    hf.config.save_pretrained(tmp_path / "src")
    import_from_hf(tmp_path / "src", tmp_path / "ours", tp=1, progress=False)
    with pytest.warns(UserWarning, match="no tokenizer given"):
        export_to_hf(tmp_path / "ours", tmp_path / "back", progress=False)
    back = safetensors_dict(tmp_path / "back")
    assert set(back) == set(state)
    assert all(torch.equal(back[n], state[n]) for n in state)
    # One unsharded file with BloomModel's names (no "transformer." prefix), as older BLOOM folders have.
    (tmp_path / "base").mkdir()
    torch.save({n.removeprefix("transformer."): t for n, t in state.items()}, tmp_path / "base" / "pytorch_model.bin")
    hf.config.save_pretrained(tmp_path / "base")
    import_from_hf(tmp_path / "base", tmp_path / "ours-base", tp=2, progress=False)
    for path in (tmp_path / "ours" / "global_step0").iterdir():
        tp1 = torch.load(path, weights_only=True)
        tp2 = [torch.load(tmp_path / "ours-base" / "global_step0" / path.name.replace("model_00", f"model_{r:02d}"),
                          weights_only=True) for r in range(2)]
        for key, tensor in tp1.items():
            dim = 0 if key in SPLIT_DIM0 else 1 if key in SPLIT_DIM1 else None
            merged = tp2[0][key] if dim is None else torch.cat([t[key] for t in tp2], dim)
            assert torch.equal(merged, tensor), (path.name, key)


# ---------------------------------------------------------------------------------------------
# Clear errors


@pytest.fixture
def hf_folder(tmp_path):
    random_hf_model().save_pretrained(tmp_path / "src", max_shard_size="100KB")
    return tmp_path / "src"


def test_import_rejects_a_folder_that_is_not_bloom(hf_folder, tmp_path):
    config = json.loads((hf_folder / "config.json").read_text())
    config["model_type"] = "gpt2"
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="model_type='gpt2', not 'bloom'"):
        import_from_hf(hf_folder, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.tmp").exists()


def test_import_names_a_missing_shard(hf_folder, tmp_path):
    index = json.loads((hf_folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (hf_folder / victim).unlink()
    with pytest.raises(ConversionError, match=f"{victim}.*missing"):
        import_from_hf(hf_folder, tmp_path / "out", progress=False)


def test_import_names_the_tensor_whose_shape_disagrees_with_config(hf_folder, tmp_path):
    config = json.loads((hf_folder / "config.json").read_text())
    config["vocab_size"] = 512
    (hf_folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"word_embeddings.weight .* shape \(256, 64\) .* implies \(512, 64\)"):
        import_from_hf(hf_folder, tmp_path / "out", progress=False)


def test_import_rejects_a_tp_size_that_does_not_divide_the_heads(hf_folder, tmp_path):
    with pytest.raises(ConversionError, match="num_attention_heads \\(4\\) is not divisible"):
        import_from_hf(hf_folder, tmp_path / "out", tp=3, progress=False)


def test_export_names_the_tensor_whose_shape_disagrees_with_config(exported, tmp_path):
    cfg, _, root, _ = exported
    wrong = tiny_config(hidden=120)
    save_config(wrong, tmp_path / "wrong.yaml")
    with pytest.raises(ConversionError, match=r"word_embeddings.weight .* \(4096, 96\) .* implies \(4096, 120\)"):
        export_to_hf(root / "ckpt", tmp_path / "out", config=tmp_path / "wrong.yaml", progress=False)
    assert not (tmp_path / "out.tmp").exists()


def test_export_names_a_missing_tp_shard(exported, tmp_path):
    _, _, root, _ = exported
    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    (tmp_path / "ckpt" / "global_step10" / "layer_04-model_01-model_states.pt").unlink()
    with pytest.raises(ConversionError, match="layer_04-model_01-model_states.pt"):
        export_to_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)


def test_export_warns_when_duplicated_tensors_drifted_apart(exported, tmp_path):
    _, model, root, _ = exported
    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "global_step10" / "layer_03-model_01-model_states.pt"
    state = torch.load(path, weights_only=True)
    state["input_layernorm.weight"] = state["input_layernorm.weight"] + 0.5
    torch.save(state, path)
    with pytest.warns(UserWarning, match="differ across TP ranks"):
        summary = export_to_hf(tmp_path / "ckpt", tmp_path / "out", progress=False)
    assert summary.drift == {"transformer.h.0.input_layernorm.weight": pytest.approx(0.5)}
    exported_weight = safetensors_dict(tmp_path / "out")["transformer.h.0.input_layernorm.weight"]
    assert torch.equal(exported_weight, model.layers[0].input_layernorm.weight)  # rank 0's copy


def test_export_needs_a_config_for_bare_layer_files(exported, tmp_path):
    _, _, root, _ = exported
    shutil.copytree(root / "ckpt" / "global_step10", tmp_path / "global_step10")
    with pytest.raises(ConversionError, match="pass --config"):
        export_to_hf(tmp_path / "global_step10", tmp_path / "out", progress=False)


# ---------------------------------------------------------------------------------------------
# The command-line tools


def _run_tool(name: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, str(REPO / "tools" / name), *args], capture_output=True, text=True,
                          cwd=REPO, env=env, timeout=300)


def test_cli_round_trip_and_errors(exported, tmp_path):
    _, _, root, _ = exported
    result = _run_tool("convert_to_hf.py", "--checkpoint", str(root / "ckpt"), "--step", "10",
                       "--output", str(tmp_path / "hf"), "--dtype", "bf16", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stdout and (tmp_path / "hf" / "model.safetensors").is_file()
    again = _run_tool("convert_to_hf.py", "--checkpoint", str(root / "ckpt"), "--output", str(tmp_path / "hf"))
    assert again.returncode == 1 and "already exists" in again.stderr

    from tools.convert_from_hf import main as import_main

    assert import_main(["--hf", str(tmp_path / "hf"), "--output", str(tmp_path / "ours"), "--tp", "2",
                        "--quiet"]) == 0
    assert (tmp_path / "ours" / "global_step0" / "layer_07-model_01-model_states.pt").is_file()
    bad = _run_tool("convert_from_hf.py", "--hf", str(tmp_path / "nothing"), "--output", str(tmp_path / "x"))
    assert bad.returncode == 1 and "convert_from_hf: error:" in bad.stderr and "config.json" in bad.stderr
    assert _run_tool("convert_to_hf.py", "--help").returncode == 0


def test_an_unreadable_client_state_is_reported_not_ignored(tmp_path):
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"not a torch file")
    with pytest.warns(UserWarning, match=r"could not read the run config from .*mp_rank_00_model_states.pt"):
        with pytest.raises(ConversionError, match="no config found"):
            resolve_config(None, tmp_path)
