"""Every bad-input case of the cluster file: one message naming the file and the YAML path."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tasks.config import (
    LAB_CLUSTER_FILE,
    PROJECT_ROOT,
    ConfigError,
    cluster_file,
    load_cluster,
    purge_refused,
    two_node_warning,
)

EXAMPLE = PROJECT_ROOT / "config" / "cluster.example.yml"


def base() -> dict:
    return yaml.safe_load(EXAMPLE.read_text())


def write(tmp_path: Path, data: dict | str) -> Path:
    p = tmp_path / "cluster.yml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def error_of(tmp_path: Path, data: dict | str) -> str:
    p = write(tmp_path, data)
    with pytest.raises(ConfigError) as e:
        load_cluster(p)
    msg = str(e.value)
    assert msg.startswith(str(p)), msg  # every message names the file
    return msg


def test_example_and_lab_files_are_valid():
    for f in (EXAMPLE, LAB_CLUSTER_FILE):
        c = load_cluster(f)
        assert len(c.nodes) == 3


def test_ssh_defaults_and_overrides(tmp_path):
    c = load_cluster(write(tmp_path, base()))
    pi1, pi3 = c.ssh_for(c.nodes[0]), c.ssh_for(c.nodes[2])
    assert (pi1.user, pi1.port) == ("pi", 22)
    assert (pi3.user, pi3.port) == ("admin", 2222)
    assert pi3.key == pi1.key == Path("~/.ssh/id_ed25519").expanduser()


def test_relative_paths_are_relative_to_the_cluster_file():
    c = load_cluster(LAB_CLUSTER_FILE)
    assert c.ssh.known_hosts == PROJECT_ROOT / ".lab" / "ssh" / "known_hosts"


def test_yaml_syntax_error_has_line_and_column(tmp_path):
    msg = error_of(tmp_path, "name: x\nnodes: [a, b\nplatform: linux/arm64\n")
    assert "YAML syntax error" in msg and "line 3, column" in msg


def test_top_level_must_be_a_mapping(tmp_path):
    assert "mapping" in error_of(tmp_path, "- a\n- b\n")


def test_unknown_key_suggests_the_close_one(tmp_path):
    d = base()
    d["nodes"][2]["adress"] = d["nodes"][2].pop("address")
    msg = error_of(tmp_path, d)
    assert "nodes[2].adress: unknown key 'adress' (did you mean 'address'?)" in msg
    assert "nodes[2].address: required key is missing" in msg


def test_unknown_nested_key(tmp_path):
    d = base()
    d["gluster"]["mountpoint"] = "/x"
    assert "gluster.mountpoint: unknown key 'mountpoint' (did you mean 'mount_point'?)" in \
        error_of(tmp_path, d)


def test_unknown_top_level_key(tmp_path):
    d = base()
    d["platfrom"] = "linux/arm64"
    assert "platfrom: unknown key 'platfrom' (did you mean 'platform'?)" in error_of(tmp_path, d)


def test_missing_required_key(tmp_path):
    d = base()
    del d["images"]["mariadb"]
    assert "images.mariadb: required key is missing" in error_of(tmp_path, d)


def test_wrong_type(tmp_path):
    d = base()
    d["homeassistant"]["port"] = "eighty"
    msg = error_of(tmp_path, d)
    assert "homeassistant.port: wrong type" in msg and "'eighty'" in msg


def test_wrong_type_list(tmp_path):
    d = base()
    d["nodes"] = {"pi1": "1.2.3.4"}
    assert "nodes: wrong type" in error_of(tmp_path, d)


def test_fewer_than_three_nodes(tmp_path):
    d = base()
    d["nodes"] = d["nodes"][:2]
    msg = error_of(tmp_path, d)
    assert "nodes: 2 node(s) given, at least 3" in msg and "allow_two_nodes" in msg


def test_one_node_is_refused_even_with_the_opt_in(tmp_path):
    d = base()
    d["nodes"], d["allow_two_nodes"] = d["nodes"][:1], True
    assert "nodes: 1 node(s) given" in error_of(tmp_path, d)


def test_two_nodes_with_opt_in_load_and_warn(tmp_path):
    d = base()
    d["nodes"], d["allow_two_nodes"] = d["nodes"][:2], True
    c = load_cluster(write(tmp_path, d))
    assert "split-brain" in two_node_warning(c)
    assert two_node_warning(load_cluster(EXAMPLE)) is None


def test_duplicate_node_names(tmp_path):
    d = base()
    d["nodes"][2]["name"] = "pi1"
    assert "nodes[2].name: duplicate node name 'pi1' (also nodes[0])" in error_of(tmp_path, d)


def test_duplicate_addresses(tmp_path):
    d = base()
    d["nodes"][1]["address"] = d["nodes"][0]["address"]
    assert "nodes[1].address: duplicate address '192.168.1.21' (also nodes[0])" in \
        error_of(tmp_path, d)


@pytest.mark.parametrize("bad", ["192.168.1.300", "pi_1.local", "-pi", "a..b", "http://pi1"])
def test_address_neither_ip_nor_hostname(tmp_path, bad):
    d = base()
    d["nodes"][2]["address"] = bad
    assert "nodes[2].address: " in (msg := error_of(tmp_path, d))
    assert "neither an IP address nor a valid host name" in msg


@pytest.mark.parametrize("good", ["pi3.local", "fe80::1", "10.0.0.3", "raspberrypi"])
def test_good_addresses(tmp_path, good):
    d = base()
    d["nodes"][2]["address"] = good
    assert load_cluster(write(tmp_path, d)).nodes[2].address == good


def test_bad_node_name(tmp_path):
    d = base()
    d["nodes"][0]["name"] = "Pi One"
    assert "nodes[0].name: 'Pi One' is not a valid node name" in error_of(tmp_path, d)


def test_unsupported_platform(tmp_path):
    d = base()
    d["platform"] = "linux/arm/v6"
    msg = error_of(tmp_path, d)
    assert "platform: 'linux/arm/v6' is not supported (did you mean 'linux/arm/v7'?)" in msg


@pytest.mark.parametrize("image", ["eclipse-mosquitto", "eclipse-mosquitto:latest"])
def test_image_without_tag_or_latest(tmp_path, image):
    d = base()
    d["images"]["mosquitto"]["image"] = image
    msg = error_of(tmp_path, d)
    assert "images.mosquitto.image: " in msg
    assert ("has no tag" in msg) if image.count(":") == 0 else ("tagged 'latest'" in msg)


def test_numeric_tag_is_a_tag_not_a_registry_port(tmp_path):
    d = base()
    d["images"]["mosquitto"]["image"] = "eclipse-mosquitto:2"
    assert load_cluster(write(tmp_path, d)).images.mosquitto.tag == "2"


def test_invalid_image_reference(tmp_path):
    d = base()
    d["images"]["mosquitto"]["image"] = "Eclipse Mosquitto:2"
    assert "images.mosquitto.image: 'Eclipse Mosquitto:2' is not a valid image reference" in \
        error_of(tmp_path, d)


def test_registry_with_port_and_digest_are_accepted(tmp_path):
    d = base()
    d["images"]["mosquitto"]["image"] = (
        "registry.local:5000/eclipse-mosquitto:2.0.20@sha256:" + "a" * 64)
    assert load_cluster(write(tmp_path, d)).images.mosquitto.tag == "2.0.20"


def test_home_assistant_newer_than_2025_11_on_armv7(tmp_path):
    d = base()
    d["platform"] = "linux/arm/v7"
    d["images"]["homeassistant"]["image"] = "ghcr.io/home-assistant/home-assistant:2025.12.1"
    msg = error_of(tmp_path, d)
    assert "images.homeassistant.image:" in msg
    assert "no 32-bit ARM images after 2025.11" in msg and "linux/arm64" in msg


def test_home_assistant_2025_11_on_armv7_and_newer_on_arm64_are_fine(tmp_path):
    d = base()
    assert d["platform"] == "linux/arm64"
    # the example's arm64 default is the current release, which has no arm/v7 image
    assert load_cluster(write(tmp_path, d)).images.homeassistant.tag == "2026.11.0"
    d["platform"] = "linux/arm/v7"
    assert "no 32-bit ARM images after 2025.11" in error_of(tmp_path, d)
    d["images"]["homeassistant"]["image"] = "ghcr.io/home-assistant/home-assistant:2025.11.3"
    assert load_cluster(write(tmp_path, d)).platform == "linux/arm/v7"
    d["platform"] = "linux/arm64"
    d["images"]["homeassistant"]["image"] = "ghcr.io/home-assistant/home-assistant:2026.3.0"
    assert load_cluster(write(tmp_path, d)).images.homeassistant.tag == "2026.3.0"


def test_portainer_enabled_needs_its_images(tmp_path):
    d = base()
    d["portainer"]["enabled"] = True
    del d["images"]["portainer_agent"]
    assert "images.portainer: portainer.enabled is true" in error_of(tmp_path, d)


@pytest.mark.parametrize("path, value, expect", [
    (("gluster", "mount_point"), "mnt/haswarm",
     "gluster.mount_point: 'mnt/haswarm' is not an absolute path"),
    (("gluster", "brick_dir"), "/", "gluster.brick_dir: '/' is a directory shared with"),
    (("galera", "buffer_pool"), "64MB", "galera.buffer_pool: '64MB' is not a size"),
    (("swarm", "publish_mode"), "mesh", "swarm.publish_mode: "),
    (("mqtt", "users"), ["sensors"], "mqtt.users: the user 'homeassistant' is required"),
    (("mqtt", "users"), ["homeassistant", "haswarm-healthcheck"],
     "mqtt.users: 'haswarm-healthcheck' is reserved"),
    (("homeassistant", "port"), 70000, "homeassistant.port: "),
    (("homeassistant", "time_zone"), "Europe Berlin", "homeassistant.time_zone: "),
])
def test_field_rules(tmp_path, path, value, expect):
    d = base()
    d[path[0]][path[1]] = value
    assert expect in error_of(tmp_path, d)


def test_unreadable_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_cluster(tmp_path / "absent.yml")


def test_which_file(tmp_path, monkeypatch):
    monkeypatch.delenv("HASWARM_CONFIG", raising=False)
    assert cluster_file(str(tmp_path / "x.yml")) == tmp_path / "x.yml"
    monkeypatch.setenv("HASWARM_CONFIG", str(tmp_path / "y.yml"))
    assert cluster_file() == tmp_path / "y.yml"


def test_doit_exits_nonzero_with_the_message_and_touches_nothing(tmp_path):
    """The real command: a bad file stops `doit` before any task (and any connection) runs."""
    d = base()
    d["nodes"][1]["address"] = "999.1.1.1"
    p = write(tmp_path, d)
    r = subprocess.run([sys.executable, "-m", "doit", f"config={p}", "setup"],
                       cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert f"{p}: nodes[1].address: '999.1.1.1' is neither" in r.stderr
    assert "Traceback" not in r.stderr and r.stdout.strip() == ""


def test_no_default_password_in_the_repository():
    """No file the repository tracks carries a password."""
    tracked = subprocess.run(["git", "ls-files"], cwd=PROJECT_ROOT, capture_output=True,
                             text=True).stdout.split()
    for name in tracked:
        f = PROJECT_ROOT / name
        if f.suffix in {".yml", ".yaml", ".j2", ".cnf", ".conf", ".env", ".sh"} and f.is_file():
            text = f.read_text(errors="ignore").lower()
            assert "pass123" not in text and "password:" not in textwrap.dedent(text), name


@pytest.mark.parametrize("seconds", [0.5, 1])
def test_dispatcher_heartbeat_below_two_seconds_is_refused(tmp_path, seconds):
    d = base()
    d["swarm"]["dispatcher_heartbeat"] = seconds
    msg = error_of(tmp_path, d)
    assert f"swarm.dispatcher_heartbeat: {seconds:g} s is too short: use 2 or more" in msg
    assert "re-register" in msg


def test_standby_follows_the_publish_mode_and_needs_host_mode(tmp_path):
    d = base()
    assert d["swarm"]["publish_mode"] == "ingress"
    assert load_cluster(write(tmp_path, d)).ha_standby is False
    d["swarm"]["publish_mode"] = "host"
    assert load_cluster(write(tmp_path, d)).ha_standby is True
    d["homeassistant"] = {"standby": False}
    assert load_cluster(write(tmp_path, d)).ha_standby is False
    d["swarm"]["publish_mode"] = "ingress"
    d["homeassistant"] = {"standby": True}
    assert "homeassistant.standby: needs swarm.publish_mode: host" in error_of(tmp_path, d)
    d["homeassistant"] = {}
    assert load_cluster(write(tmp_path, d)).mqtt_standby is False
    d["mqtt"] = {"standby": True}
    assert "mqtt.standby: needs swarm.publish_mode: host" in error_of(tmp_path, d)
    d["swarm"]["publish_mode"] = "host"
    assert load_cluster(write(tmp_path, d)).mqtt_standby is True
    d["mqtt"] = {"standby": False}
    assert load_cluster(write(tmp_path, d)).mqtt_standby is False


# ---------------------------------------------------------------------------------------------
# Paths on the nodes: brick dir and mount point


@pytest.mark.parametrize("field", ["brick_dir", "mount_point"])
@pytest.mark.parametrize("bad, expect", [
    ("/srv/gluster haswarm", "is not an absolute path of letters, digits"),
    ("/srv/\"haswarm\"", "is not an absolute path of letters, digits"),
    ("/srv/it's", "is not an absolute path of letters, digits"),
    ("/srv/a\nb", "is not an absolute path of letters, digits"),
    ("/srv/x/../../etc", "must not contain '..'"),
    ("/etc", "'/etc' is a directory of the operating system"),
    ("/etc/haswarm", "'/etc/haswarm' is inside /etc, a directory of the operating system"),
    ("/usr/local/haswarm", "is inside /usr"),
    ("/lib64/x", "is inside /lib64"),
    ("/tmp/haswarm", "is inside /tmp"),
    ("/var/lib/docker/volumes/x", "is inside /var/lib/docker"),
    ("/srv", "'/srv' is a directory shared with the operating system"),
    ("/var", "'/var' is a directory shared with the operating system"),
    ("/home", "e.g. /home/haswarm"),
    ("/var/lib", "'/var/lib' is a directory shared"),
])
def test_node_paths_are_safe_and_not_the_systems(tmp_path, field, bad, expect):
    d = base()
    d["gluster"][field] = bad
    msg = error_of(tmp_path, d)
    assert f"gluster.{field}: " in msg and expect in msg, msg


@pytest.mark.parametrize("good", ["/srv/gluster/haswarm", "/mnt/usb-ssd/brick_1",
                                  "/home/pi/haswarm", "/var/lib/haswarm", "/data/gluster.b"])
def test_good_node_paths(tmp_path, good):
    d = base()
    d["gluster"]["brick_dir"] = good
    d["gluster"]["mount_point"] = "/mnt/haswarm-volume"
    assert str(load_cluster(write(tmp_path, d)).gluster.brick_dir) == good


@pytest.mark.parametrize("brick, mount", [("/srv/haswarm", "/srv/haswarm"),
                                          ("/srv/haswarm", "/srv/haswarm/mnt"),
                                          ("/mnt/haswarm/brick", "/mnt/haswarm")])
def test_brick_and_mount_point_apart(tmp_path, brick, mount):
    d = base()
    d["gluster"].update(brick_dir=brick, mount_point=mount)
    msg = error_of(tmp_path, d)
    assert f"gluster.mount_point: '{mount}' and gluster.brick_dir '{brick}' overlap" in msg


def test_brick_and_mount_point_side_by_side_are_fine(tmp_path):
    d = base()
    d["gluster"].update(brick_dir="/srv/haswarm-brick", mount_point="/srv/haswarm")
    assert load_cluster(write(tmp_path, d)).gluster.brick_on_root_fs is False


# ---------------------------------------------------------------------------------------------
# Rules across fields: ports, addresses, free-text commands


@pytest.mark.parametrize("section, port, expect", [
    ("mqtt", 8123, "mqtt.port: port 8123 is also homeassistant.port: two services cannot"),
    ("mqtt", 22, "mqtt.port: port 22 is used by SSH on the nodes"),
    ("homeassistant", 2222, "homeassistant.port: port 2222 is used by SSH"),  # pi3's own
    ("mqtt", 24007, "mqtt.port: port 24007 is used by glusterd"),
    ("homeassistant", 2377, "swarm's control plane"),
    ("mqtt", 50000, "mqtt.port: port 50000 is in the range glusterd gives its bricks"),
])
def test_published_port_clashes(tmp_path, section, port, expect):
    d = base()
    d[section]["port"] = port
    assert expect in error_of(tmp_path, d)


def test_portainer_on_the_brokers_port(tmp_path):
    d = base()
    d["portainer"].update(enabled=True, port=1883)
    assert "portainer.port: port 1883 is also mqtt.port" in error_of(tmp_path, d)
    d["portainer"]["enabled"] = False
    load_cluster(write(tmp_path, d))  # a disabled Portainer publishes nothing


@pytest.mark.parametrize("address, prefix, expect", [
    ("192.168.1.22", 24, "vip.address: 192.168.1.22 is pi2's own address"),
    ("10.0.0.5", 24, "vip.address: 10.0.0.5 is not in the nodes' network: pi1 is at "
                     "192.168.1.21, outside 10.0.0.0/24"),
    ("192.168.2.250", 24, "outside 192.168.2.0/24"),
    ("192.168.1.255", 24, "vip.address: 192.168.1.255 is the broadcast address of "
                          "192.168.1.0/24"),
    ("192.168.1.0", 24, "is the network address"),
])
def test_vip_outside_the_nodes_network_or_on_a_node(tmp_path, address, prefix, expect):
    d = base()
    d["vip"].update(address=address, prefix_length=prefix)
    assert expect in error_of(tmp_path, d)


def test_vip_in_a_wider_network_and_host_names_are_fine(tmp_path):
    d = base()
    d["vip"].update(address="192.168.2.250", prefix_length=16)
    assert load_cluster(write(tmp_path, d)).vip.address == "192.168.2.250"
    d["vip"]["prefix_length"] = 24
    for node in d["nodes"]:
        node["address"] = f"{node['name']}-host.lan"  # checked by `doit vip`, once resolved
    load_cluster(write(tmp_path, d))


def test_same_ip_spelled_twice(tmp_path):
    d = base()
    d["nodes"][0]["address"], d["nodes"][2]["address"] = "fe80::1", "FE80:0::1"
    assert "nodes[2].address: duplicate address 'FE80:0::1' (also nodes[0])" in \
        error_of(tmp_path, d)


@pytest.mark.parametrize("address", ["pi1", "pi1.local", "PI1.lan"])
def test_node_listed_by_name_and_by_address(tmp_path, address):
    d = base()
    d["nodes"].append({"name": "pi4", "address": address})
    msg = error_of(tmp_path, d)
    assert f"nodes[3].address: {address!r} names the node 'pi1' (nodes[0], at " \
           "192.168.1.21): the same node listed twice" in msg


def test_a_node_by_its_own_host_name_is_fine(tmp_path):
    d = base()
    d["nodes"][0]["address"] = "pi1.local"
    assert load_cluster(write(tmp_path, d)).nodes[0].address == "pi1.local"


@pytest.mark.parametrize("command, expect", [
    ("systemctl restart avahi-daemon\nrm -rf /", "holds a newline or another control"),
    ("systemctl restart avahi-daemon\trm", "holds a newline or another control"),
    ("date +%s > /tmp/x", "holds '%', which cron turns into a newline"),
    ("   ", "is empty"),
])
def test_restart_command_is_one_cron_safe_line(tmp_path, command, expect):
    d = base()
    d["mdns"]["restart_command"] = command
    msg = error_of(tmp_path, d)
    assert "mdns.restart_command: " in msg and expect in msg


@pytest.mark.parametrize("user", ["pi user", "pi\n", "Root", "$(id)"])
def test_ssh_user_is_a_login_name(tmp_path, user):
    d = base()
    d["ssh"]["user"] = user
    assert "ssh.user: " in (msg := error_of(tmp_path, d)) and "valid login name" in msg


@pytest.fixture
def doit_vars(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """doit's command-line variables (NAME=VALUE), as this test sets them."""
    import doit

    values: dict[str, str] = {}
    monkeypatch.setattr(doit, "get_var", lambda name, default=None: values.get(name, default))
    return values


def test_purge_asks_for_the_stack_name_first(doit_vars: dict[str, str]) -> None:
    c = load_cluster(LAB_CLUSTER_FILE)
    asked: list[str] = []

    def answer(text: str) -> Callable[[str], str]:
        return lambda prompt: asked.append(prompt) or text

    assert purge_refused(c, ["doit", "clean"], None) is None  # no purge: nothing to ask
    doit_vars["purge"] = "yes"
    refused = purge_refused(c, ["doit", "clean"], None)  # no terminal
    assert refused and "add yes=1" in refused and "Nothing was done" in refused
    assert "stack 'haswarm'" in refused and str(LAB_CLUSTER_FILE) in refused
    assert purge_refused(c, ["doit", "clean"], answer("haswarm")) is None
    assert "Type the stack's name (haswarm)" in asked[-1]
    assert purge_refused(c, ["doit", "clean"], answer("y")) == \
        "purge not confirmed: nothing was done"
    assert purge_refused(c, ["doit", "clean", "-n"], None) is None  # a dry run changes nothing
    doit_vars["yes"] = "1"
    assert purge_refused(c, ["doit", "clean"], None) is None
