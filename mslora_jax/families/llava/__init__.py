"""The LLaVA family: the paper's generative setting (vision tower, projector, decoder) on VQA.

- ``experiment.py``: the ``StreamExperiment`` (answer cross-entropy, generation, answer metrics)
  and the backbone's pretraining objective.
- ``setup.py``: data, tokenizer and frozen backbone of a run, and what a whole run calls
  (``FAMILY``).
"""
