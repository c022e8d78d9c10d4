r"""Feature quality of one model state: probe and kNN accuracy and coding-rate reduction.

:class:`Evaluator` loads the evaluation images once (test-time transform) and, for any feature
map ``features(x) -> (n, d)``, reports

* ``probe``: linear-probe top-1 on the test images (trained on the labelled pretraining images),
* ``knn``: weighted cosine kNN top-1, same split,
* ``dr_class``: :math:`\Delta R` of the test features under the class partition,
* ``dr_views_seen`` / ``dr_views_unseen``: :math:`\Delta R` under the two-views partition for
  views of pretraining images / of held-out images never trained on. Memorisation shows as the
  seen value rising above the unseen one in late layers.

Every :math:`\Delta R` uses ``cfg.eps2`` and at most ``cfg.dr_samples`` rows (the first ones:
fixed across checkpoints).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from applications.bissl.augment import TwoViewAugment
from applications.bissl.data import LabeledDataset, TwoViewDataset

from .coding_rate import coding_rate_reduction, two_view_labels
from .config import UMMConfig
from .data import Splits, eval_tensors
from .probes import knn_accuracy, linear_probe

__all__ = ["Evaluator"]


def _views(images: LabeledDataset, cfg: UMMConfig, n: int) -> tuple[Tensor, Tensor]:
    """One fixed pair of views (epoch 0 seeds) of the first ``n`` images."""
    ds = TwoViewDataset(
        images.subset(range(min(n, len(images)))), TwoViewAugment(cfg.image_size, cfg.in_channels), seed=cfg.seed
    )
    pairs = [ds[i] for i in range(len(ds))]
    return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])


class Evaluator:
    """Evaluation images of a run, loaded once; call :meth:`metrics` with a feature function."""

    def __init__(self, splits: Splits, cfg: UMMConfig, device: torch.device | str = "cpu") -> None:
        self.cfg, self.device = cfg, torch.device(device)
        self.train_x, self.train_y = eval_tensors(splits.pretrain, cfg)
        self.test_x, self.test_y = eval_tensors(splits.test, cfg)
        half = max(2, cfg.dr_samples // 2)
        self.seen = _views(splits.pretrain, cfg, half)
        self.unseen = _views(splits.heldout, cfg, half)

    def _run(self, features: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([features(x[i : i + 512].to(self.device)).float().cpu() for i in range(0, len(x), 512)])

    def features(self, features: Callable[[Tensor], Tensor]) -> dict[str, Tensor]:
        """The raw features of every evaluation set (keys ``train``, ``test``, ``seen1/2``, ``unseen1/2``)."""
        return {
            "train": self._run(features, self.train_x),
            "test": self._run(features, self.test_x),
            "seen1": self._run(features, self.seen[0]),
            "seen2": self._run(features, self.seen[1]),
            "unseen1": self._run(features, self.unseen[0]),
            "unseen2": self._run(features, self.unseen[1]),
        }

    def metrics_of(self, f: dict[str, Tensor]) -> dict[str, float]:
        """The five metrics from :meth:`features` output."""
        cfg, n = self.cfg, self.cfg.dr_samples
        f = {k: v.double() for k, v in f.items()}
        te, ty = f["test"][:n], self.test_y[:n]
        keep = torch.isin(ty, torch.unique(ty)[torch.unique(ty, return_counts=True)[1] >= 2])

        def views(a: Tensor, b: Tensor) -> float:
            return float(coding_rate_reduction(torch.cat([a, b]), two_view_labels(a.shape[0]), cfg.eps2))

        return {
            "probe": linear_probe(
                f["train"], self.train_y, f["test"], self.test_y, steps=cfg.probe_steps, wd=cfg.probe_wd
            ),
            "knn": knn_accuracy(f["train"], self.train_y, f["test"], self.test_y, k=cfg.knn_k),
            "dr_class": float(coding_rate_reduction(te[keep], ty[keep], cfg.eps2)),
            "dr_views_seen": views(f["seen1"], f["seen2"]),
            "dr_views_unseen": views(f["unseen1"], f["unseen2"]),
        }

    def metrics(self, features: Callable[[Tensor], Tensor]) -> dict[str, float]:
        """Metrics of ``features`` (a no-grad callable images -> ``(n, d)``, modules already in eval mode)."""
        return self.metrics_of(self.features(features))
