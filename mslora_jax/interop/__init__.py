"""Readers and writers of formats from outside this library, in one place.

What can be loaded and written:

- ``safetensors_folder``: Hugging Face weights folders (``model.safetensors`` or shards), read
  lazily one tensor at a time.
- ``hf_names``: the table-driven machinery every weight converter shares (flax path -> HF tensor
  name, names and shapes checked before anything is read, ``config.json`` settings compared).
- ``backbone_folder``: writing a converted backbone folder (what ``backbone.source="load"``
  reads) all at once.
- ``hf_clip`` / ``clip``: a Hugging Face ``CLIPModel`` (optionally with a BERT text tower) into the
  dual encoder, with its ``tokenizer.json`` (``mslora-jax convert-clip``).
- ``hf_llava`` / ``llava_med``: LLaVA(-Med v1.5) weights into the generative backbone
  (``mslora-jax convert-llava-med``).
- ``peft`` / ``peft_run``: LoRA adapters as Hugging Face PEFT folders and back
  (``mslora-jax export-peft``, ``mslora-jax import-peft``).
- ``released`` / ``released_run``: the released MSLoRA-CR trainer's ``cl_lora.bin`` files into the
  finished stages of a run folder (``mslora-jax import-released``).
- ``hf_bert``: a Hugging Face ``BertModel`` (or sentence-transformers) folder into the BERT text
  tower ``models.bert.BertTextEncoder`` (``load_hf_bert``, ``convert-clip --text-hf-dir``).

Not here, though they concern the released code: its evaluator's answer metrics are
``eval/released_metrics.py`` (a metric definition, chosen by ``eval.metrics``), and its
``answer-file.jsonl`` is read by ``data/answer_file.py``, which reads this library's own answer
files too (``mslora-jax score`` scores either).

Layering: ``interop`` sits beside ``train``'s callers (``cli/``, ``experiments/``): it may use
``train/`` (the backbone and run folders it writes are the ones runs read) and the lower layers,
and nothing below ``cli/`` imports it.
"""
