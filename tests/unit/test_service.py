"""tasks/service.py: one command builder for systemd, the lab's stand-in and SysV."""

from __future__ import annotations

import subprocess

from tasks.service import LAB_SERVICE, SYSTEMD, service


def test_each_init_system_gets_its_own_command():
    cmd = service("glusterd", "start", enable=True, direct="glusterd")
    assert f"if {SYSTEMD}; then systemctl enable --now glusterd;" in cmd
    assert f"elif [ -x {LAB_SERVICE} ]; then {LAB_SERVICE} glusterd start;" in cmd
    assert "then service glusterd start; else glusterd; fi" in cmd
    stop = service("docker", "stop", units="docker.socket docker.service")
    assert "systemctl stop docker.socket docker.service" in stop


def test_no_init_system_fails_with_a_message(tmp_path):
    # a shell where none of systemctl, lab-service, service exists
    cmd = service("nothing", "start").replace(LAB_SERVICE, str(tmp_path / "absent"))
    p = subprocess.run(["/bin/sh", "-c", cmd], env={"PATH": str(tmp_path)},
                       capture_output=True, text=True)
    assert p.returncode != 0 and "cannot start nothing" in p.stderr
