"""Init systems behind one command builder: what starts or stops a daemon on a node.

A Pi runs systemd; the lab's simulated Pis have a stand-in (`lab-service`, lab/lab-service.sh)
because they have no systemd; other Debian machines may only have SysV `service`. Every remote
start/stop of a daemon goes through `service()`, so the choice is made in one place, on the
node, at run time.
"""

from __future__ import annotations

import shlex

# Shell test: the node runs systemd (as PID 1) and has systemctl.
SYSTEMD = "[ -d /run/systemd/system ] && command -v systemctl >/dev/null"
# The lab's stand-in for systemctl (installed in every simulated Pi).
LAB_SERVICE = "/usr/local/sbin/lab-service"


def service(name: str, action: str, *, units: str | None = None, enable: bool = False,
            direct: str | None = None) -> str:
    """A shell command that does `action` (start | stop | restart) to daemon `name`: with
    systemd on `units` (default: `name`; `enable` also enables them for the next boot when
    starting), else with the lab's helper, else with SysV `service`, else `direct` (e.g. the
    daemon itself); failing with a message when none applies."""
    q = shlex.quote(name)
    targets = units or q
    if action == "start" and enable:
        systemd = f"systemctl enable --now {targets}"
    else:
        systemd = f"systemctl {action} {targets}"
    last = direct or (f"echo 'cannot {action} {name}: no systemd, lab-service or service "
                      "command on this node' >&2; false")
    return (f"if {SYSTEMD}; then {systemd}; "
            f"elif [ -x {LAB_SERVICE} ]; then {LAB_SERVICE} {q} {action}; "
            f"elif command -v service >/dev/null; then service {q} {action}; "
            f"else {last}; fi")
