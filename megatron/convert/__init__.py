"""Converters between our checkpoints and Hugging Face transformers BLOOM.

    layout.py             layer indices, tensor keys, full shapes and TP split/merge rules of layer files
    layer_files.py        reading/writing ``layer_XX-model_YY-model_states.pt``; filling our modules from them
    hf_mapping.py         transformers names <-> ours (single-device model and layer files)
    hf_files.py           config.json, generation_config.json and tokenizer files of an HF folder
    safetensors_stream.py sharded safetensors written tensor by tensor
    to_hf.py              export_to_hf: checkpoint -> transformers folder (tools/convert_to_hf.py)
    from_hf.py            import_from_hf: transformers folder -> checkpoint (tools/convert_from_hf.py)
"""

from megatron.convert.errors import ConversionError

__all__ = ["ConversionError"]
