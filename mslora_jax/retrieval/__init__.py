"""Retrieval: an index of embeddings (``index``), exact and approximate top-k search sharded over
a device mesh (``search``), and the metrics of a ranking (``metrics``).

The continual protocol (which encoder indexes which task after each stage) builds on these; the
pieces here know no model: an index is arrays plus the encoder version of every row.
"""
