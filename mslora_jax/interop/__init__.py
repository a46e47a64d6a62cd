"""Readers and writers of formats from outside this library, in one place.

What can be loaded and written:

- ``safetensors_folder``: Hugging Face weights folders (``model.safetensors`` or shards), read
  lazily one tensor at a time.
- ``hf_llava`` / ``llava_med``: LLaVA(-Med v1.5) weights into the generative backbone
  (``mslora-jax convert-llava-med``).
- ``hf_bert``: a Hugging Face ``BertModel`` (or sentence-transformers) folder into the BERT text
  tower ``models.bert.BertTextEncoder`` (``load_hf_bert``).
- ``tensor_map``: the table-driven name/shape checking and reading the converters share.

Layering: ``interop`` sits beside ``train``'s callers (``cli/``, ``experiments/``): it may use
``train/`` (the backbone and run folders it writes are the ones runs read) and the lower layers,
and nothing below ``cli/`` imports it.
"""
