"""UMM-style bilevel fine-tuning (arXiv 2410.00772) on the public :mod:`hypergrad` API.

First *see* late-layer memorisation, then *undo* it:

* ``python -m applications.umm pretrain``: SimCLR pretraining that keeps a checkpoint every
  ``--save-every`` epochs (:mod:`~applications.umm.pretrain`).
* ``python -m applications.umm diagnose``: per tap (stem, layer1..layer4, projector) and per
  checkpoint, linear-probe and kNN accuracy and coding-rate reduction (class and two-views
  partitions) as a table and plots (:mod:`~applications.umm.diagnose`).
* ``python -m applications.umm finetune``: the bilevel fine-tuning of the late blocks and its
  comparison with continued SSL training (:mod:`~applications.umm.finetune`,
  :mod:`~applications.umm.objectives`).
* ``python -m applications.umm run``: all three.

The coding-rate math is in :mod:`~applications.umm.coding_rate`. Backbones, SSL losses,
augmentations and datasets are imported from :mod:`applications.bissl`.
"""

from __future__ import annotations
