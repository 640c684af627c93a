"""Shell snippets that several subsystems run on the nodes (light: no SSH imports here)."""

from __future__ import annotations

# True on a node booted with systemd (a Pi); the lab's nodes have /usr/local/sbin/lab-service.
SYSTEMD = "[ -d /run/systemd/system ] && command -v systemctl >/dev/null"


def service_command(service: str, action: str, units: str | None = None) -> str:
    """Shell text for `systemctl ACTION UNITS` on a Pi, `lab-service SERVICE ACTION` on a lab
    node, `service SERVICE ACTION` elsewhere."""
    return (f"if {SYSTEMD}; then systemctl {action} {units or service}; "
            f"elif [ -x /usr/local/sbin/lab-service ]; then /usr/local/sbin/lab-service {service} "
            f"{action}; else service {service} {action}; fi")
