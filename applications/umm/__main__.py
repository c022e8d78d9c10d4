"""``python -m applications.umm {pretrain,diagnose,finetune,run} --preset NAME [overrides]`` (see :mod:`.cli`)."""

from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
