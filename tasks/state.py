"""What each remote step found when it last converged: one JSON file per step in the build
directory (`build/state/<step>.json`: when, and facts worth keeping, never secrets).

A record, not a cache: remote steps run on every `doit setup` and ask the nodes (tasks.ops
`remote_task`). A clean action removes the step's record.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tasks.config import PROJECT_ROOT, Cluster


def stamp(c: Cluster, step: str) -> Path:
    """The stamp file of `step` (e.g. 'gluster-volume')."""
    return (PROJECT_ROOT / c.build_dir / "state" / f"{step}.json").resolve()


def mark_done(c: Cluster, step: str, facts: dict[str, Any] | None = None) -> None:
    """Record that `step` converged (with optional facts worth keeping, never secrets)."""
    p = stamp(c, step)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps({"done": time.strftime("%Y-%m-%dT%H:%M:%S"), **(facts or {})},
                            indent=2, sort_keys=True) + "\n")


def forget(c: Cluster, step: str) -> None:
    """Drop the stamp (from clean actions)."""
    stamp(c, step).unlink(missing_ok=True)
