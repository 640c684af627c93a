"""What the benchmark scripts share: the lab's cluster, which must be up and deployed."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.driver import Lab  # noqa: E402
from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster  # noqa: E402


def running_lab() -> tuple[Cluster, Lab]:
    """The lab cluster (config/lab.yml) and its lab; exits when the lab is not running."""
    c = load_cluster(LAB_CLUSTER_FILE)
    lab = Lab(c)
    if not lab.is_up():
        raise SystemExit("the lab is not running: doit lab-up && doit setup")
    return c, lab
