"""Continual cross-modal retrieval (Wang, Herranz and van de Weijer, CLVision 2021) over a
finished run: the database grows task by task while the encoders learn, and which encoder
indexed each stored item decides how much retrieval forgets.

Training, indexing and querying are decoupled: the run trains (``train/``), this folder reads
each method's stage checkpoints, indexes and queries with the encoder after every stage, and
scores the rankings with ``mslora_jax.retrieval``.

- ``items``: what is indexed and what is asked, per task (the same draw for every method);
- ``encoders``: the encoder after each stage of a method, and the embeddings it gives, computed
  once each;
- ``protocol``: the index policies, galleries and directions, as matrices ``R[k][j]`` (after
  stage k, on task j) with their average, backward transfer and forgetting;
- ``gallery``: which queries and results the gallery picture shows.
"""
