"""Layer files: TP split/merge rules, discovery, writing from and loading into our modules, and
the streaming safetensors writer (one process)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from megatron.checkpoint.layer_files import (
    LayerFileSet,
    is_layer_files_only,
    load_layer_files_into,
    load_tensor_file,
    read_merged_layer,
    resolve_checkpoint_dir,
    save_layer_files,
)
from megatron.checkpoint.layout import iteration_of
from megatron.checkpoint.resharding import merge_shards, split_full
from megatron.checkpoint.store import write_latest
from megatron.convert.safetensors_stream import (
    SafetensorsReader,
    ShardedSafetensorsWriter,
    TensorPlan,
    parse_size,
    plan_shards,
)
from megatron.errors import ConversionError
from megatron.model.bloom import build_model
from megatron.model.layout import (
    BLOCK_KEYS,
    EMBEDDING_KEYS,
    hf_name_to_layer_key,
    layer_indices,
    layer_key_to_hf_name,
    module_key_to_layer,
    partition_dim,
)
from test_convert_hf import contract_layer_files, random_model, tiny_config


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("key", EMBEDDING_KEYS + BLOCK_KEYS + ("weight", "bias"))
def test_split_then_merge_gives_the_tensor_back(key, tp):
    full = torch.randn(16, 8) if key.endswith("weight") and "norm" not in key and key != "weight" else torch.randn(16)
    shards = [split_full(key, full, r, tp) for r in range(tp)]
    merged, drift = merge_shards(key, shards)
    assert torch.equal(merged, full) and drift == 0.0
    if partition_dim(key) is not None and tp > 1:
        assert shards[0].untyped_storage().nbytes() == shards[0].numel() * 4  # no view of the full tensor


def test_merge_reports_duplicates_that_drifted_apart():
    a = torch.ones(4)
    _, drift = merge_shards("input_layernorm.weight", [a, a + 0.25])
    assert drift == pytest.approx(0.25)
    with pytest.raises(ConversionError, match="not a tensor of a BLOOM layer file"):
        partition_dim("self_attention.rotary.inv_freq")


def test_module_names_map_to_megatron_deepspeed_layer_indices():
    assert module_key_to_layer("embedding.word_embeddings.norm.bias", 24) == (1, "word_embeddings.norm.bias")
    assert module_key_to_layer("layers.0.mlp.dense_h_to_4h.weight", 24) == (3, "mlp.dense_h_to_4h.weight")
    assert module_key_to_layer("final_layernorm.weight", 24) == (28, "weight")
    assert module_key_to_layer("tied_modules.embed.word_embeddings.weight", 24) == (1, "word_embeddings.weight")
    assert module_key_to_layer("17.self_attention.dense.bias", 24) == (17, "self_attention.dense.bias")
    assert layer_indices(2) == [1, 3, 4, 6]
    for hf_name, layer in (("transformer.h.3.mlp.dense_4h_to_h.bias", (6, "mlp.dense_4h_to_h.bias")),
                           ("word_embeddings_layernorm.weight", (1, "word_embeddings.norm.weight")),
                           ("transformer.ln_f.bias", (28, "bias"))):
        assert hf_name_to_layer_key(hf_name, 24) == layer
        assert layer_key_to_hf_name(*layer, 24) == "transformer." + hf_name.removeprefix("transformer.")


def test_save_layer_files_follows_the_contract_and_loads_back(tmp_path):
    cfg = tiny_config(num_layers=2)
    model = random_model(cfg)
    written = save_layer_files(model, tmp_path / "ours" / "global_step1")
    contract_layer_files(model, tmp_path / "contract" / "global_step1", tp=1)
    assert sorted(p.name for p in written) == sorted(p.name for p in (tmp_path / "contract" / "global_step1").iterdir())
    for path in written:
        mine, expected = load_tensor_file(path), load_tensor_file(tmp_path / "contract" / "global_step1" / path.name)
        assert list(mine) == list(expected) and all(torch.equal(mine[k], expected[k]) for k in mine)
    fresh = build_model(cfg.model, seed=5)
    report = load_layer_files_into(fresh, tmp_path / "ours")  # no 'latest': the highest global_step*
    assert report["tensors"] == len(model.state_dict()) and report["files"] == 4 and report["step"] == 1
    assert is_layer_files_only(tmp_path / "ours" / "global_step1")
    (tmp_path / "ours" / "global_step1" / "mp_rank_00_model_states.pt").write_bytes(b"")
    assert not is_layer_files_only(tmp_path / "ours" / "global_step1")
    assert iteration_of(tmp_path / "ours") is None
    for name, tensor in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], tensor), name


def test_merged_layer_equals_the_single_device_tensors(tmp_path):
    cfg = tiny_config(num_layers=2)
    model = random_model(cfg)
    contract_layer_files(model, tmp_path, tp=3)
    files = LayerFileSet.discover(tmp_path)
    assert (files.tp_size, files.num_layers) == (3, 2)
    block = read_merged_layer(files, 4).tensors
    for key in BLOCK_KEYS:
        assert torch.equal(block[key], model.state_dict()[f"layers.1.{key}"]), key


def test_checkpoint_directory_resolution(tmp_path):
    model = random_model(tiny_config(num_layers=1))
    for step in (5, 20):
        save_layer_files(model, tmp_path / f"global_step{step}")
    assert resolve_checkpoint_dir(tmp_path).name == "global_step20"
    write_latest(tmp_path, "global_step5")
    assert resolve_checkpoint_dir(tmp_path).name == "global_step5"
    assert resolve_checkpoint_dir(tmp_path, step=20).name == "global_step20"
    assert resolve_checkpoint_dir(tmp_path / "global_step20") == tmp_path / "global_step20"
    with pytest.raises(ConversionError, match="global_step7 has no layer files.*global_step20"):
        resolve_checkpoint_dir(tmp_path, step=7)
    with pytest.raises(ConversionError, match="does not exist"):
        resolve_checkpoint_dir(tmp_path / "nope")


def test_loading_into_a_model_of_another_shape_names_the_tensor(tmp_path):
    model = random_model(tiny_config(num_layers=2))
    save_layer_files(model, tmp_path / "global_step1")
    wider = build_model(tiny_config(num_layers=2, hidden=120).model)
    message = (r"'word_embeddings.weight' in .*layer_01-model_00.* shape \(4096, 96\) "
               r"but the model's 'embedding.word_embeddings.weight' has shape \(4096, 120\)")
    with pytest.raises(ConversionError, match=message):
        load_layer_files_into(wider, tmp_path)
    deeper = build_model(tiny_config(num_layers=3).model)
    with pytest.raises(ConversionError, match="3 transformer layers but .* holds 2"):
        load_layer_files_into(deeper, tmp_path)


def test_discovery_rejects_incomplete_checkpoints(tmp_path):
    model = random_model(tiny_config(num_layers=2))
    contract_layer_files(model, tmp_path, tp=2)
    (tmp_path / "layer_03-model_00-model_states.pt").unlink()
    with pytest.raises(ConversionError, match="layer_03-model_00-model_states.pt"):
        LayerFileSet.discover(tmp_path)
    for path in tmp_path.glob("layer_03-*"):
        path.unlink()
    with pytest.raises(ConversionError, match="missing \\[3\\]"):
        LayerFileSet.discover(tmp_path)


def test_tensor_files_are_loaded_safely(tmp_path):
    torch.save({"a": torch.ones(2), "meta": {"step": 3}}, tmp_path / "nested.pt")
    with pytest.raises(ConversionError, match="flat dict of tensors"):
        load_tensor_file(tmp_path / "nested.pt")
    torch.save({"a": torch.ones(1000)}, tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:500])
    with pytest.raises(ConversionError, match="cut.pt.*truncated"):
        load_tensor_file(tmp_path / "cut.pt")


def test_streaming_safetensors_writer(tmp_path):
    tensors = {"a": torch.randn(10, 10), "b": torch.randn(300).to(torch.bfloat16), "c": torch.arange(7),
               "d": torch.randn(4, 3).half()}
    plan = [TensorPlan(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    assert [[p.name for p in s] for s in plan_shards(plan, 500)] == [["a"], ["b"], ["c", "d"]]
    with ShardedSafetensorsWriter(tmp_path, plan, 500) as writer:
        with pytest.raises(ConversionError, match="expected a, got b"):
            writer.write("b", tensors["b"])
        with pytest.raises(ConversionError, match="planned"):
            writer.write("a", tensors["a"].double())
        writer.write("a", list(tensors["a"].chunk(2)))  # parts concatenated along dim 0
        for name in ("b", "c", "d"):
            writer.write(name, tensors[name])
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    loaded = {}
    for file in set(index["weight_map"].values()):
        loaded.update(load_file(tmp_path / file))
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert index["metadata"]["total_size"] == 400 + 600 + 56 + 24
    assert (parse_size("5GB"), parse_size("2GiB"), parse_size("100KB"), parse_size(7)) == (5 * 10**9, 2 * 2**30,
                                                                                           10**5, 7)
    with pytest.raises(ValueError, match="cannot read size"):
        parse_size("five gigs")


def test_safetensors_reader_matches_the_library_and_rejects_truncation(tmp_path):
    from safetensors.torch import save_file

    tensors = {"w": torch.randn(5, 7), "b": torch.randn(9).to(torch.bfloat16), "e": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"format": "pt"})
    reader = SafetensorsReader(tmp_path / "x.safetensors")
    assert set(reader.keys()) == set(tensors) and reader.metadata == {"format": "pt"}
    for name, tensor in tensors.items():
        assert reader.shape(name) == tuple(tensor.shape) and reader.dtype(name) == tensor.dtype
        assert torch.equal(reader.get_tensor(name), tensor), name
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    cut = SafetensorsReader(tmp_path / "cut.safetensors")
    last = max(cut.keys(), key=lambda k: cut.entries[k]["data_offsets"][1])
    with pytest.raises(ConversionError, match="truncated"):
        cut.get_tensor(last)
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(ConversionError, match="not a readable safetensors file"):
        SafetensorsReader(tmp_path / "junk.safetensors")


def test_partition_table_matches_the_model_layers():
    """megatron/model/layout.py's table agrees with what the model's column- and row-parallel
    layers tag their parameters with (the layers are the other witness of the split)."""
    model = random_model(tiny_config(num_layers=2))
    for name, param in model.named_parameters():
        tagged = param.partition_dim if getattr(param, "tensor_model_parallel", False) else None
        assert partition_dim(module_key_to_layer(name, 2)[1]) == tagged, name
