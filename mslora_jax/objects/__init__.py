"""Object retrieval (MS-UGCML, Kan et al., arXiv 2403.10798): find every instance of a query
object in a collection of images, with region embeddings learned without labels.

Built so far from the library's pieces: detection data (``data.coco``, ``data.synthetic_scenes``),
class-agnostic proposals (``data.proposals``), crops at mixed scales (``data.crops``), STML and
the cross-group distillation (``losses.stml``), neighbour batches (``retrieval.neighbours``) and
object-level metrics (``retrieval.object_metrics``). Here:

- ``evaluate``: the object-level protocol for any embedding function: ground-truth crops of the
  test images as queries against the proposal crops of the same images;
- ``model``: the region embedder, the dual encoder's image tower under per-group small and large
  heads;
- ``ema``: the train step with a momentum teacher (the shared step, then the moving average).

Next (docs/development.md, "Not done yet"): the EMA-teacher training of the four methods
(``frozen``, ``infonce``, ``stml``, ``msgcml``) through the shared loop, the configs, the picture
and the BCCD sweep.
"""
