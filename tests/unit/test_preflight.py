"""tasks.preflight without nodes: the brick's file system read by the real probe (run here, in
sh) and judged against `gluster.brick_on_root_fs`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tasks.config import LAB_CLUSTER_FILE, Cluster, load_cluster
from tasks.preflight import Facts, brick_fs_probe, judge, parse_facts


def _cluster(brick: str = "/srv/gluster/haswarm", on_root: bool = False) -> Cluster:
    c = load_cluster(LAB_CLUSTER_FILE)
    return c.model_copy(update={"gluster": c.gluster.model_copy(
        update={"brick_dir": Path(brick), "brick_on_root_fs": on_root})})


def _ready(node: str, brick_fs: str | None) -> Facts:
    """A node that passes every other check."""
    f = Facts(node, "10.77.0.11", machine="x86_64", docker_version="20.10.24",
              docker_arch="amd64", engine_id=f"id-{node}", disk_free=10 * 1024**3,
              disk_path="/var/lib/docker", clock_skew=0.0)
    f.brick_fs = brick_fs
    return f


def test_probe_walks_up_to_an_existing_parent_and_names_its_mount() -> None:
    c = _cluster("/nonexistent-haswarm-test/a/b")
    out = subprocess.run(["sh", "-c", brick_fs_probe(c)], capture_output=True, text=True,
                         check=True).stdout
    want = subprocess.run(["df", "-P", "/"], capture_output=True, text=True,
                          check=True).stdout.splitlines()[1].split()[5]
    assert parse_facts(Facts("pi1", "x"), out).brick_fs == want == "/"


def test_brick_on_the_root_fs_needs_the_opt_in() -> None:
    facts = {n: _ready(n, fs) for n, fs in (("pi1", "/"), ("pi2", "/srv"), ("pi3", None))}
    judged = judge(_cluster(), facts)
    assert judged["pi2"].problems == [] and judged["pi3"].problems == []
    (problem,) = judged["pi1"].problems
    assert problem.startswith("brick: /srv/gluster/haswarm is on the root file system")
    assert "gluster.brick_on_root_fs: true" in problem
    assert judge(_cluster(on_root=True), facts)["pi1"].problems == []
