"""Per-queue statistics, with the names DPDK's vDPA drivers use."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields

__all__ = ["STAT_NAMES", "QueueStats"]


@dataclass
class QueueStats:
    """Counters of one virtqueue (``stats <dev> <qid>`` in the vdpa app)."""

    received_desc: int = 0
    completed_desc: int = 0
    bad_desc_errors: int = 0
    exceed_max_chain: int = 0
    invalid_buffer: int = 0
    completion_errors: int = 0
    packets: int = 0
    bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def as_dict(self) -> dict[str, int]:
        """The counters by name."""
        return {name: getattr(self, name) for name in STAT_NAMES}

    def reset(self) -> None:
        """Zero every counter."""
        for name in STAT_NAMES:
            setattr(self, name, 0)


STAT_NAMES = tuple(f.name for f in fields(QueueStats) if not f.name.startswith("_"))
