"""The node list the stack reads at run time, one file on every node.

Home Assistant's and Mosquitto's lock keepers probe every node to tell a cut-off node (they
fence it when it reaches no majority), and a Galera member counts the nodes that must report
before a recovery bootstrap. They read the node list from this file, bind-mounted read-only
into their containers, and re-read it while they run: it is not in the services' specs, so a
node added or removed (`nodes:` edited, `doit setup`) changes no spec and restarts no running
Home Assistant, broker or database member.

    members     /etc/haswarm/members/nodes (0644 root): the nodes' addresses, one a line, in
                the cluster file's order; written atomically (renamed into place) after the
                volume has every node (a keeper then reaches the new node's glusterd).
                clean: the file and its directory removed (after the stack is gone)
"""

from __future__ import annotations

import shlex
from typing import TYPE_CHECKING, Any

from tasks.config import Cluster, Node, current
from tasks.ops import Op, apply_ops, on_nodes, put_on_nodes, remote_task

if TYPE_CHECKING:
    from tasks.remote import Remote

MEMBERS_DIR = "/etc/haswarm/members"
MEMBERS_FILE = f"{MEMBERS_DIR}/nodes"  # the same path inside the containers (stack.yml)


def members_text(c: Cluster) -> str:
    """The file's content: every node's address, one a line."""
    return "".join(f"{n.address}\n" for n in c.nodes)


def setup_members(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """The node list on every node (written only where it differs)."""
    return put_on_nodes(r, "members", MEMBERS_FILE, members_text(c), dryrun=dryrun,
                        about=f" ({len(c.nodes)} nodes)")


def clean_members(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Remove the node list (and /etc/haswarm when nothing else is left in it)."""
    step = "members (clean)"
    q = shlex.quote(MEMBERS_DIR)

    def one(node: Node) -> None:
        exists = r.run(node, step, f"[ -e {q} ]", check=False).ok
        ops = [Op(f"remove {MEMBERS_DIR}",
                  f"rm -rf -- {q} && rmdir -- /etc/haswarm 2>/dev/null; true")] if exists else []
        apply_ops(r, node, step, ops, dryrun=dryrun)

    on_nodes(r, step, one)


def task_members() -> dict[str, Any]:
    """The node list the stack's keepers and Galera read (/etc/haswarm/members/nodes)."""
    c = current()
    return remote_task(c, "members", None, f"{MEMBERS_FILE} on every node ({len(c.nodes)} "
                       "addresses)", setup_members, clean_members, task_dep=["gluster"])
