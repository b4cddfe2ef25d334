"""Converters between our checkpoints and Hugging Face transformers BLOOM.

    hf_mapping.py         transformers state dicts <-> ours (names: megatron/model/layout.py)
    output.py             an output folder that appears complete or not at all
    hf_files.py           config.json, generation_config.json and tokenizer files of an HF folder
    safetensors_stream.py sharded safetensors written tensor by tensor
    to_hf.py              export_to_hf: checkpoint -> transformers folder (tools/convert_to_hf.py)
    from_hf.py            import_from_hf: transformers folder -> checkpoint (tools/convert_from_hf.py)
"""

