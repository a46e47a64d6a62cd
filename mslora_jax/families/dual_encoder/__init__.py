"""The dual-encoder family: a CLIP-style image/text model on image classification tasks.

- ``experiment.py``: the ``StreamExperiment`` (nearest-class-prompt prediction, prototype router).
- ``objectives.py``: CLIP InfoNCE against class prompts, for pretraining and for each adapter.
- ``backbone.py``: the frozen backbone (random, pretrained on base tasks, or loaded).
- ``setup.py``: what a whole run calls (``FAMILY``).
"""
