"""The drill's faults on the lab, and a look into a node that needs no SSH.

`LabFaults` is what `tasks.drill.run_drill` (and the chaos and outage runs) use on the lab:
`kill` (every process of the node ends at once: peers' TCP connections are reset, as when a
Pi's kernel is still there to answer), `cut` (its link goes silently down: peers only time out,
as after a power cut or a pulled cable) and `docker` (its Docker engine stopped, the one fault
a real cluster has: `tasks.drill.DockerFaults`). `run_on` looks into a node with nsenter, so
the watch also sees inside a node that is cut off.
"""

from __future__ import annotations

import os
import threading

from lab.driver import Lab, LabError, instance_lab
from tasks.config import Cluster
from tasks.drill import DockerFaults, DrillError
from tasks.watch import RunOn


def lab_for(c: Cluster) -> Lab:
    """The lab this cluster file describes (an instance lab with HASWARM_LAB_INSTANCE)."""
    instance = os.environ.get("HASWARM_LAB_INSTANCE", "")
    if instance:
        return instance_lab(instance, len(c.nodes))
    return Lab(c)


def lab_runner(lab: Lab) -> RunOn:
    """run_on through the lab (nsenter: no SSH, and it also sees into a cut node)."""
    def run_on(node: str, cmd: str, timeout: float) -> str | None:
        try:
            p = lab.exec(node, cmd, check=False, timeout=timeout)
        except LabError:  # node not running, or no answer in time
            return None
        return p.stdout if p.returncode == 0 else None

    return run_on


class LabFaults:
    """kill, cut and docker on the lab's nodes."""

    kinds: tuple[str, ...] = ("kill", "cut", "docker")

    def __init__(self, c: Cluster, lab: Lab | None = None) -> None:
        self.lab = lab or lab_for(c)
        self.docker = DockerFaults(c)

    def inject(self, kind: str, node: str) -> threading.Thread | None:
        try:
            if kind == "kill":
                self.lab.kill(node)
            elif kind == "cut":
                self.lab.cut(node)
            else:
                return self.docker.inject(kind, node)
        except LabError as e:
            raise DrillError(str(e)) from None
        return None

    def restore(self, kind: str, node: str) -> None:
        try:
            if kind == "kill":
                self.lab.boot(node)
            elif kind == "cut":
                self.lab.heal(node)
            else:
                self.docker.restore(kind, node)
        except LabError as e:
            raise DrillError(str(e)) from None

    def run_on(self) -> RunOn:
        return lab_runner(self.lab)
