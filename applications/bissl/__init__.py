"""BiSSL (arXiv 2410.02387) on the public :mod:`hypergrad` API.

The pipeline has three stages, each a Python function and a CLI command
(``python -m applications.bissl {pretrain,bissl,finetune,run}``):

1. :mod:`~applications.bissl.pretrain` - SimCLR or BYOL pretext pretraining
   (:mod:`~applications.bissl.models`, :mod:`~applications.bissl.losses`,
   :mod:`~applications.bissl.augment`, :mod:`~applications.bissl.optim`).
2. The bilevel BiSSL stage (lower pretext level, upper downstream level).
3. Fine-tuning with random-search HPO and seeded runs.

Every stage runs inside one scaffold, :class:`~applications.bissl.stage_run.StageRun` (output
folder, resume file, metrics, progress, rank-0 saves and barriers).

Datasets live in :mod:`applications.bissl.data`; rank/world helpers and the
gradient-carrying ``all_gather`` in :mod:`~applications.bissl.distributed`.
"""

from __future__ import annotations
