"""haswarm: highly available Home Assistant on a handful of Raspberry Pis.

The graph in one screen. `doit list` shows every task; `doit setup` deploys, `doit clean`
removes. The cluster file: `doit config=PATH ...`, else $HASWARM_CONFIG, else config/cluster.yml,
else the local lab (config/lab.yml).
"""

import sys

from tasks.config import ConfigError, current, purge_refused, two_node_warning

try:
    CLUSTER = current()
except ConfigError as error:
    sys.exit(f"haswarm: invalid cluster file\n{error}")
if warning := two_node_warning(CLUSTER):
    print(warning, file=sys.stderr)
if refused := purge_refused(CLUSTER, sys.argv, input if sys.stdin.isatty() else None):
    sys.exit(f"haswarm: {refused}")

from lab.tasks import (  # noqa: E402
    task_lab_boot,
    task_lab_cut,
    task_lab_down,
    task_lab_engine,
    task_lab_heal,
    task_lab_kill,
    task_lab_status,
    task_lab_up,
    task_lab_wipe,
)
from tasks import images  # noqa: E402
from tasks.avahi import task_avahi  # noqa: E402
from tasks.backup import backup_task, restore_task  # noqa: E402
from tasks.depart import task_depart  # noqa: E402
from tasks.drill import drill_task  # noqa: E402
from tasks.firewall import task_firewall  # noqa: E402
from tasks.galera import stack_task  # noqa: E402
from tasks.gluster import task_gluster  # noqa: E402
from tasks.guard import task_leader_guard  # noqa: E402
from tasks.homeassistant import task_ha_files  # noqa: E402
from tasks.members import task_members  # noqa: E402
from tasks.onboard import task_ha_onboard  # noqa: E402
from tasks.plan import plan_task  # noqa: E402
from tasks.preflight import task_preflight  # noqa: E402
from tasks.render import task_render  # noqa: E402
from tasks.secrets import task_secrets  # noqa: E402
from tasks.stack import objects_task  # noqa: E402
from tasks.status import task_status  # noqa: E402
from tasks.swarm import swarm_task  # noqa: E402
from tasks.vip import task_vip  # noqa: E402

DOIT_CONFIG = {
    "default_tasks": ["setup"],
    "dep_file": ".doit.db",
    "backend": "json",
    "verbosity": 2,
    "minversion": "0.36.0",
}

__all__ = [
    "task_base_image", "task_buildx", "task_images", "task_preload_images",
    "task_avahi", "task_depart", "task_firewall", "task_gluster", "task_ha_files",
    "task_ha_onboard", "task_members",
    "task_preflight", "task_render", "task_secrets", "task_setup", "task_swarm",
    "task_stack_objects", "task_stack",
    "task_vip", "task_leader_guard", "task_status", "task_drill", "task_plan",
    "task_backup", "task_restore",
    "task_lab_engine", "task_lab_up", "task_lab_down", "task_lab_kill", "task_lab_cut",
    "task_lab_heal", "task_lab_boot", "task_lab_wipe", "task_lab_status",
]


# The lab starts itself (and, for the images, a Docker engine on this machine) when it is the
# target; nothing in tasks/ knows the lab.
LAB_UP = ["lab-up"] if CLUSTER.lab else []
LAB_ENGINE = ["lab-engine"] if CLUSTER.lab else []


def _after(deps: list[str], task: dict) -> dict:
    return {**task, "task_dep": [*task.get("task_dep", []), *deps]} if deps else task


def task_buildx():
    """Fetch buildx (Debian trixie's docker-buildx) into BUILD/tools when docker lacks it."""
    return images.task_buildx()


def task_base_image():
    """Make the base images the Dockerfiles build FROM exist locally for the platform."""
    return _after(LAB_ENGINE, images.task_base_image())


def task_images():
    """Pull or build every image of the stack for the platform and save it (BUILD/images)."""
    for t in images.task_images():
        yield _after(LAB_ENGINE, t) if "actions" in t else t


def task_preload_images():
    """Put every image on every node (only what each lacks), nodes in parallel."""
    yield from images.task_preload_images()


def task_drill():
    """Take a node down on purpose; probe every service; restore; check nothing was lost."""
    if CLUSTER.lab:
        return drill_task(CLUSTER, _lab_faults)
    return drill_task(CLUSTER)


def task_backup():
    """Archive the database, HA's config, Mosquitto's store and HA's token into backups/."""
    return backup_task(CLUSTER)


def task_restore():
    """Put an archive back (`doit restore backup=PATH`): files, database, token; HA restarted."""
    return restore_task(CLUSTER)


def _lab_faults(c):
    """The lab's faults, imported when a drill runs (`doit list` stays light)."""
    from lab.faults import LabFaults

    return LabFaults(c)


# `doit setup`, in order; `doit plan` runs the remote steps of the same list dry.
SETUP = [*LAB_UP, "preflight", "depart", "firewall", "secrets", "render", "images",
         "preload-images", "gluster", "ha-files", "avahi", "members", "swarm", "leader-guard",
         "stack-objects", "stack", "vip", "ha-onboard"]


def task_setup():
    """Deploy the whole cluster (everything below, in order)."""
    return {"actions": None, "task_dep": SETUP}


def task_plan():
    """Show what `doit setup` would change on each node, from the nodes' facts (changes none)."""
    return plan_task(SETUP)


def task_swarm():
    """Form the Docker swarm: an odd count of managers, the dispatcher heartbeat applied."""
    return swarm_task(CLUSTER, after=["gluster", "avahi", "preload-images"])


def task_stack_objects():
    """Create the Docker configs and secrets the stack uses (missing ones only)."""
    return objects_task(CLUSTER, after=["secrets", "render"])


def task_stack():
    """Deploy the stack (bootstraps Galera when fresh) and wait until Home Assistant answers."""
    return stack_task(CLUSTER, after=["render", "ha-files", "members"])
