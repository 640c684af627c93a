"""tasks/ops.py: `apply_ops` passes a put's mode and owner, a command's timeout and hint."""

from __future__ import annotations

from typing import Any

from tasks.config import LAB_CLUSTER_FILE, load_cluster
from tasks.ops import Op, apply_ops


class Recorder:
    """Just enough of `Remote` for `apply_ops`: records run and put calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def run(self, node: Any, step: str, cmd: str, **kw: Any) -> None:
        self.calls.append(("run", step, cmd, kw))

    def put(self, node: Any, step: str, data: str, path: str, **kw: Any) -> bool:
        self.calls.append(("put", step, path, data, kw))
        return True


def test_apply_ops_passes_mode_owner_timeout_and_hint(capsys):
    node = load_cluster(LAB_CLUSTER_FILE).nodes[0]
    ops = [Op("write /etc/a", put=("/etc/a", "a\n")),  # the default: 0644, owner as is
           Op("write /etc/b", put=("/etc/b", "b\n"), mode=0o755, owner="root:root"),
           Op("start x", "start-x", hint="see the log", timeout=60)]
    r = Recorder()
    assert apply_ops(r, node, "step", ops) is True
    assert r.calls == [
        ("put", "step", "/etc/a", "a\n", {"mode": 0o644, "owner": None}),
        ("put", "step", "/etc/b", "b\n", {"mode": 0o755, "owner": "root:root"}),
        ("run", "step", "start-x", {"hint": "see the log", "timeout": 60}),
    ]
    out = capsys.readouterr().out
    assert "step: write /etc/b" in out and "step: start x" in out


def test_apply_ops_dry_run_and_nothing_to_do(capsys):
    node = load_cluster(LAB_CLUSTER_FILE).nodes[0]
    r = Recorder()
    assert apply_ops(r, node, "step", [Op("start x", "start-x")], dryrun=True) is True
    assert apply_ops(r, node, "step", []) is False
    assert r.calls == []
    out = capsys.readouterr().out
    assert "step: would start x" in out and "step: nothing to do" in out
