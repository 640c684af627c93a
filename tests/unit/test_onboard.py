"""`doit ha-onboard` against a fake Home Assistant: onboarding, token, MQTT config flow.

`FakeHA` is an http.server on 127.0.0.1 that answers the endpoints haswarm calls in the shapes
of Home Assistant's own source (2024.1.6 and 2026.2.3, homeassistant/components/onboarding/
views.py, auth/__init__.py, config/config_entries.py, helpers/data_entry_flow.py,
mqtt/config_flow.py), including the websocket API's auth and `auth/long_lived_access_token`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import secrets as random
import socket
import struct
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tasks import onboard, render, secrets, status
from tasks.config import LAB_CLUSTER_FILE, Cluster, Node, load_cluster
from tasks.ha_api import Entry, HAError, parse_entries, parse_onboarding
from tasks.onboard import Facts, plan

STEPS = ["user", "core_config", "analytics", "integration"]
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455


class FakeHA:
    """What haswarm can see of a Home Assistant, kept in memory."""

    def __init__(self) -> None:
        self.done: list[str] = []
        self.users: dict[str, str] = {}  # username -> password
        self.codes: dict[str, str] = {}  # auth code -> client_id
        self.access: set[str] = set()  # short-lived access tokens (with a credential)
        self.llat: dict[str, str] = {}  # client_name -> long-lived token
        self.entries: list[dict[str, Any]] = []
        self.entry_data: dict[str, dict[str, Any]] = {}
        # open flows: flow id -> advanced options shown (True), the advanced form ("advanced")
        self.flows: dict[str, bool | str] = {}
        self.broker_ok = True
        self.core_config_status = 200  # 500: an integration it sets up failed (2024.1)
        self.core_config_delay = 0.0  # s before it answers (2024.1 waits for integrations)
        self.restarted = False  # started again since onboarding was done
        self.websocket_ok = True
        self.mqtt_connected = True  # HA's MQTT client gets what the broker sends
        self.subscribers: dict[str, tuple[Any, int]] = {}  # topic -> (websocket out, id)
        self.calls: list[str] = []  # "METHOD /path"
        self.lock = threading.Lock()

    def changes(self) -> list[str]:
        """Every call that was not a read."""
        return [c for c in self.calls if not c.startswith("GET ") and c != "WS config/auth/list"]

    def auth_command(self, msg: dict[str, Any]) -> Any:
        """HA's websocket config/auth commands, on `users` (a user's id: "id-" + login)."""
        kind = msg["type"]
        if kind == "config/auth/list":
            return [{"id": "id-system", "username": None, "name": "Home Assistant Content"},
                    *({"id": f"id-{u}", "username": u, "name": u} for u in self.users)]
        if kind == "config/auth/create":
            assert msg["group_ids"] == ["system-admin"] and msg["local_only"] is True
            return {"user": {"id": f"id-{msg['name']}", "name": msg["name"]}}
        if kind == "config/auth_provider/homeassistant/create":
            assert msg["user_id"] == f"id-{msg['username']}"
            self.users[msg["username"]] = msg["password"]
            return None
        assert kind == "config/auth_provider/homeassistant/admin_change_password"
        self.users[msg["user_id"].removeprefix("id-")] = msg["password"]
        return None

    def deliver(self, topic: str, payload: str) -> None:
        """The broker sends HA a message: subscribers over the websocket API get an event."""
        with self.lock:
            if self.mqtt_connected and topic in self.subscribers:
                out, msg_id = self.subscribers[topic]
                _send_frame(out, {"id": msg_id, "type": "event", "event": {
                    "topic": topic, "payload": payload, "qos": 0, "retain": False}})

    def onboarded_by_hand(self) -> str:
        """Onboarding done in the browser; returns an admin's long-lived token (the user's)."""
        self.done = list(STEPS)
        self.users["alice"] = "hers"
        token = random.token_hex(16)
        self.llat["alice's laptop"] = token
        return token


def _read_frame(rfile) -> str | None:
    head = rfile.read(2)
    if len(head) < 2 or head[0] & 0x0F == 8:
        return None
    length = head[1] & 0x7F
    if length == 126:
        length = struct.unpack(">H", rfile.read(2))[0]
    elif length == 127:
        length = struct.unpack(">Q", rfile.read(8))[0]
    mask = rfile.read(4) if head[1] & 0x80 else b"\0\0\0\0"
    data = rfile.read(length)
    return bytes(b ^ mask[i % 4] for i, b in enumerate(data)).decode()


def _send_frame(wfile, message: dict[str, Any]) -> None:
    data = json.dumps(message).encode()
    if len(data) < 126:
        head = bytes([0x81, len(data)])
    else:
        head = bytes([0x81, 126]) + struct.pack(">H", len(data))
    wfile.write(head + data)
    wfile.flush()


def handler_for(ha: FakeHA) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def reply(self, code: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def body(self) -> Any:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Type") == "application/x-www-form-urlencoded":
                return dict(urllib.parse.parse_qsl(raw.decode()))
            return json.loads(raw) if raw else {}

        def token(self) -> str | None:
            """'access' or 'llat' for a valid bearer token, else None (HA answers 401)."""
            got = self.headers.get("Authorization", "").removeprefix("Bearer ")
            if got in ha.access:
                return "access"
            return "llat" if got in ha.llat.values() else None

        def do_GET(self) -> None:
            path, _, query = self.path.partition("?")
            with ha.lock:
                ha.calls.append(f"GET {path}")
            if path in ("/", "/manifest.json"):
                return self.reply(200, {})
            if path == "/api/onboarding":
                if ha.restarted and set(ha.done) == set(STEPS):
                    return self.reply(404, "404: Not Found")  # no onboarding views then
                return self.reply(200, [{"step": s, "done": s in ha.done} for s in STEPS])
            if path == "/api/websocket" and ha.websocket_ok:
                return self.websocket()
            if path == "/api/config/config_entries/entry":
                if not self.token():
                    return self.reply(401, {"message": "401: Unauthorized"})
                domain = dict(urllib.parse.parse_qsl(query)).get("domain")
                return self.reply(200, [e for e in ha.entries
                                        if domain is None or e["domain"] == domain])
            self.reply(404, {"message": "404: Not Found"})

        def do_DELETE(self) -> None:
            with ha.lock:
                ha.calls.append(f"DELETE {self.path}")
            ha.flows.pop(self.path.rsplit("/", 1)[-1], None)
            self.reply(200, {"message": "Flow aborted"})

        def do_POST(self) -> None:
            with ha.lock:
                ha.calls.append(f"POST {self.path}")
                self.post(self.path, self.body())

        def post(self, path: str, data: Any) -> None:
            if path == "/api/onboarding/users":  # requires_auth = False
                if set(data) != {"client_id", "name", "username", "password", "language"}:
                    return self.reply(400, {"message": "Message format incorrect"})
                if "user" in ha.done:
                    return self.reply(403, {"message": "User step already done"})
                ha.users[data["username"]] = data["password"]
                ha.done.append("user")
                code = random.token_hex(8)
                ha.codes[code] = data["client_id"]
                return self.reply(200, {"auth_code": code})
            if path == "/auth/token":
                if data.get("grant_type") != "authorization_code" \
                        or ha.codes.pop(data.get("code", ""), None) != data.get("client_id"):
                    return self.reply(400, {"error": "invalid_request",
                                            "error_description": "Invalid code"})
                access = random.token_hex(16)
                ha.access.add(access)
                return self.reply(200, {"access_token": access, "token_type": "Bearer",
                                        "refresh_token": random.token_hex(16),
                                        "expires_in": 1800, "ha_auth_provider": "homeassistant"})
            kind = self.token()
            if kind is None:
                return self.reply(401, {"message": "401: Unauthorized"})
            step = path.removeprefix("/api/onboarding/")
            if step in ("core_config", "analytics", "integration"):
                if step in ha.done:
                    return self.reply(403, {"message": f"{step} step already done"})
                if step == "integration" and set(data) != {"client_id", "redirect_uri"}:
                    return self.reply(400, {"message": "Message format incorrect"})
                ha.done.append(step)  # marked done before the checks below, as HA does
                if step == "core_config":
                    time.sleep(ha.core_config_delay)
                if step == "core_config" and ha.core_config_status != 200:
                    return self.reply(ha.core_config_status, {"message": "Internal Server Error"})
                if step != "integration":
                    return self.reply(200, {})
                client = urllib.parse.urlparse(data["client_id"])
                redirect = urllib.parse.urlparse(data["redirect_uri"])
                if (client.scheme, client.netloc) != (redirect.scheme, redirect.netloc):
                    return self.reply(400, {"message": "invalid client id or redirect uri"})
                if kind == "llat":
                    return self.reply(403, {"message": "Credentials for user not available"})
                return self.reply(200, {"auth_code": random.token_hex(8)})
            if path == "/api/config/config_entries/flow":
                if data.get("handler") != "mqtt":
                    return self.reply(404, {"message": "Invalid handler specified"})
                flow_id = random.token_hex(8)
                if any(e["domain"] == "mqtt" for e in ha.entries):
                    return self.reply(200, {"type": "abort", "flow_id": flow_id,
                                            "handler": "mqtt",
                                            "reason": "single_instance_allowed"})
                ha.flows[flow_id] = bool(data.get("show_advanced_options"))
                return self.reply(200, self.broker_form(flow_id, {}))
            flow_id = path.removeprefix("/api/config/config_entries/flow/")
            if flow_id in ha.flows:
                allowed = {"broker", "port", "username", "password", "advanced_options"}
                if ha.flows[flow_id] == "advanced":
                    allowed = (allowed - {"advanced_options"}) | {"keepalive"}
                if not {"broker", "port"} <= set(data) or set(data) - allowed:
                    return self.reply(400, {"message": f"User input malformed: {list(data)}"})
                if data.get("keepalive") is not None and int(data["keepalive"]) < 15:
                    return self.reply(400, {"message": "keepalive: value must be at least 15"})
                if data.get("advanced_options"):  # HA shows the advanced fields next
                    ha.flows[flow_id] = "advanced"
                    return self.reply(200, self.broker_form(flow_id, {}))
                if not ha.broker_ok:
                    return self.reply(200, self.broker_form(flow_id,
                                                            {"base": "cannot_connect"}))
                del ha.flows[flow_id]
                entry = {"entry_id": random.token_hex(8), "domain": "mqtt",
                         "title": data["broker"], "source": "user", "state": "loaded",
                         "supports_options": True, "disabled_by": None, "reason": None}
                ha.entries.append(entry)
                ha.entry_data[entry["entry_id"]] = {**data, "discovery": True}
                return self.reply(200, {"type": "create_entry", "flow_id": flow_id,
                                        "handler": "mqtt", "title": data["broker"],
                                        "version": 1, "result": entry,
                                        "description": None, "description_placeholders": None})
            self.reply(404, {"message": "404: Not Found"})

        def broker_form(self, flow_id: str, errors: dict[str, str]) -> dict[str, Any]:
            schema = [{"name": "broker", "required": True}, {"name": "port", "required": True},
                      {"name": "username", "optional": True},
                      {"name": "password", "optional": True}]
            if ha.flows[flow_id] == "advanced":
                schema += [{"name": "client_id", "optional": True},
                           {"name": "keepalive", "optional": True}]
            elif ha.flows[flow_id]:
                schema.append({"name": "advanced_options", "optional": True})
            return {"type": "form", "flow_id": flow_id, "handler": "mqtt", "step_id": "broker",
                    "data_schema": schema,
                    "errors": errors, "description_placeholders": None, "last_step": None}

        def websocket(self) -> None:
            key = self.headers["Sec-WebSocket-Key"]
            accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            self.send_response(101)
            self.send_header("Upgrade", "websocket")
            self.send_header("Connection", "Upgrade")
            self.send_header("Sec-WebSocket-Accept", accept)
            self.end_headers()
            self.close_connection = True
            _send_frame(self.wfile, {"type": "auth_required", "ha_version": "2024.1.6"})
            auth = json.loads(_read_frame(self.rfile) or "{}")
            with ha.lock:
                ok = auth.get("access_token") in ha.access | set(ha.llat.values())
            _send_frame(self.wfile, {"type": "auth_ok" if ok else "auth_invalid",
                                     "ha_version": "2024.1.6"})
            while ok and (frame := _read_frame(self.rfile)) is not None:
                msg = json.loads(frame)
                with ha.lock:
                    ha.calls.append(f"WS {msg.get('type')}")
                    name, days = msg.get("client_name"), msg.get("lifespan")
                    kind = msg.get("type", "")
                    if kind.startswith("config/auth"):
                        reply = {"id": msg["id"], "type": "result", "success": True,
                                 "result": ha.auth_command(msg)}
                    elif msg.get("type") == "mqtt/subscribe":
                        ha.subscribers[msg["topic"]] = (self.wfile, msg["id"])
                        reply = {"id": msg["id"], "type": "result", "success": True,
                                 "result": None}
                    elif msg.get("type") != "auth/long_lived_access_token" \
                            or not isinstance(name, str) or not isinstance(days, int):
                        reply = {"id": msg.get("id"), "type": "result", "success": False,
                                 "error": {"code": "invalid_format", "message": "bad"}}
                    elif name in ha.llat:
                        reply = {"id": msg["id"], "type": "result", "success": False,
                                 "error": {"code": "home_assistant_error",
                                           "message": f"{name} already exists"}}
                    else:
                        ha.llat[name] = random.token_hex(24)
                        reply = {"id": msg["id"], "type": "result", "success": True,
                                 "result": ha.llat[name]}
                    _send_frame(self.wfile, reply)

    return Handler


class FakeBroker:
    """Just enough of an MQTT 3.1.1 broker: CONNACK 0 for `password`, PUBLISH handed to
    `on_publish` (the broker's subscriber, Home Assistant)."""

    def __init__(self, password: str, on_publish) -> None:
        self.password, self.on_publish = password, on_publish
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with conn:
                packets = self.packets(conn)
                connect = next(packets, None)
                ok = connect is not None and self.password.encode() in connect[1]
                conn.sendall(bytes([0x20, 2, 0, 0 if ok else 5]))
                for kind, body in packets if ok else ():
                    if kind == 3:
                        n = int.from_bytes(body[:2], "big")
                        self.on_publish(body[2:2 + n].decode(), body[2 + n:].decode())

    @staticmethod
    def packets(conn):
        while head := conn.recv(1):
            length, shift = 0, 0
            while True:
                byte = conn.recv(1)[0]
                length += (byte & 0x7F) << shift
                shift += 7
                if not byte & 0x80:
                    break
            body = b""
            while len(body) < length:
                body += conn.recv(length - len(body))
            yield head[0] >> 4, body


@pytest.fixture
def ha():
    fake = FakeHA()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(fake))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    fake.port = server.server_address[1]
    yield fake
    server.shutdown()
    server.server_close()


def cluster(tmp_path: Path, port: int, **ha_settings: Any) -> Cluster:
    """The lab's cluster with Home Assistant at 127.0.0.1:port and secrets under tmp_path."""
    c = load_cluster(LAB_CLUSTER_FILE)
    nodes = [Node(name="pi1", address="127.0.0.1"), Node(name="pi2", address="127.0.0.2"),
             Node(name="pi3", address="127.0.0.3")]
    homeassistant = c.homeassistant.model_copy(update={"port": port, **ha_settings})
    c = c.model_copy(update={"nodes": nodes, "homeassistant": homeassistant,
                             "secrets_dir": tmp_path / "secrets", "build_dir": tmp_path / "build"})
    secrets.ensure(c)
    return c


def shown_secrets(c: Cluster, text: str, ha: FakeHA) -> list[str]:
    values = secrets.secret_values(c) + list(ha.llat.values()) + list(ha.access)
    return [v for v in values if v and v in text]


# ---------------------------------------------------------------------------------------------
# End to end against the fake


def test_first_run_onboards_and_adds_mqtt_then_a_rerun_does_nothing(ha, tmp_path, capsys):
    c = cluster(tmp_path, ha.port)
    facts = onboard.setup(c, None)

    assert ha.done == STEPS
    assert ha.users == {"owner": secrets.read(c, secrets.HA_OWNER_PASSWORD),
                        "haswarm-keeper": secrets.read(c, secrets.HA_KEEPER_PASSWORD)}
    token = secrets.token_path(c)
    assert token.read_text().strip() == ha.llat["haswarm"]
    assert token.stat().st_mode & 0o777 == 0o600
    [entry] = ha.entries
    assert ha.entry_data[entry["entry_id"]] == {
        "broker": "mosquitto", "port": 1883, "username": "homeassistant",
        "password": secrets.read(c, "mqtt_homeassistant"), "keepalive": 15,
        "discovery": True}  # keepalive: through the advanced options (ha_api.broker_body)
    assert facts == {"via": "pi1", "onboarded": True, "mqtt": ["loaded"]}
    first = capsys.readouterr().out
    assert "pi1: ha-onboard: create the owner account 'owner'" in first
    assert "onboarding done; MQTT integration loaded" in first
    assert not shown_secrets(c, first, ha)

    before = list(ha.changes())
    onboard.setup(c, None)
    again = capsys.readouterr().out
    assert ha.changes() == before  # nothing POSTed, no token made
    assert "pi1: ha-onboard: nothing to do" in again
    assert len(ha.entries) == 1 and list(ha.llat) == ["haswarm"]

    ha.restarted = True  # an onboarded HA started again has no onboarding views: 404
    onboard.setup(c, None)
    assert "pi1: ha-onboard: nothing to do" in capsys.readouterr().out
    assert ha.changes() == before


def test_home_assistant_onboarded_by_hand_is_left_alone_with_how_to(ha, tmp_path, capsys):
    ha.onboarded_by_hand()
    c = cluster(tmp_path, ha.port)
    onboard.setup(c, None)
    out = capsys.readouterr().out
    assert ha.changes() == []
    assert ha.entries == [] and not secrets.token_path(c).exists()
    assert "haswarm has no token for it" in out and "left as it is" in out
    assert "Add integration > MQTT; broker mosquitto, port 1883, user homeassistant" in out
    assert str(secrets.path(c, "mqtt_homeassistant")) in out
    assert str(secrets.token_path(c)) in out
    assert not shown_secrets(c, out, ha)


def test_a_token_the_user_provides_adds_mqtt_to_a_hand_onboarded_ha(ha, tmp_path, capsys):
    theirs = tmp_path / "my-ha-token"
    theirs.write_text(ha.onboarded_by_hand() + "\n")
    c = cluster(tmp_path, ha.port, token_file=theirs)
    onboard.setup(c, None)
    assert [e["state"] for e in ha.entries] == ["loaded"]
    assert ha.users == {"alice": "hers",  # and the keeper's user, added with her token
                        "haswarm-keeper": secrets.read(c, secrets.HA_KEEPER_PASSWORD)}
    assert list(ha.llat) == ["alice's laptop"]
    assert "haswarm" not in ha.llat
    assert not shown_secrets(c, capsys.readouterr().out, ha)
    assert status_state(c) == "loaded"


def test_unfinished_onboarding_with_our_token_is_finished(ha, tmp_path):
    """A run stopped after the owner and the token: the next one finishes the other steps."""
    c = cluster(tmp_path, ha.port)
    ha.done = ["user"]
    ha.llat["haswarm"] = "ours-from-before"
    secrets.write_private(secrets.token_path(c), "ours-from-before")
    onboard.setup(c, None)
    assert sorted(ha.done) == sorted(STEPS)  # integration: 403 with a long-lived token, done
    assert len(ha.entries) == 1


def test_a_broker_home_assistant_cannot_use_fails_naming_node_and_what_to_do(ha, tmp_path):
    ha.broker_ok = False
    c = cluster(tmp_path, ha.port)
    with pytest.raises(HAError) as e:
        onboard.setup(c, None)
    text = str(e.value)
    assert "ha-onboard on pi1" in text and "cannot_connect" in text
    assert "what to do: check that Mosquitto runs" in text
    assert not shown_secrets(c, text, ha)
    assert ha.entries == [] and not ha.flows  # the flow was aborted, not left open
    ha.broker_ok = True
    onboard.setup(c, None)  # the owner exists and the token is ours: only MQTT is left
    assert len(ha.entries) == 1


def test_a_step_that_failed_after_it_was_marked_done_counts_as_done(ha, tmp_path, capsys):
    ha.core_config_status = 500
    c = cluster(tmp_path, ha.port)
    onboard.setup(c, None)
    assert ha.done == STEPS and len(ha.entries) == 1


def test_a_step_that_answers_late_counts_as_done_once_marked(ha, tmp_path, monkeypatch):
    from tasks import ha_api

    monkeypatch.setattr(ha_api, "STEP_TIMEOUT", 0.3)
    ha.core_config_delay = 1.0
    c = cluster(tmp_path, ha.port)
    onboard.setup(c, None)
    assert ha.done == STEPS and len(ha.entries) == 1


def test_no_token_after_the_owner_was_made_says_how_to_go_on(ha, tmp_path, capsys):
    ha.websocket_ok = False
    c = cluster(tmp_path, ha.port)
    with pytest.raises(HAError) as e:
        onboard.setup(c, None)
    assert "ha-onboard on pi1: websocket" in e.value.message
    assert f"save it in {secrets.token_path(c)}" in e.value.hint
    assert str(secrets.path(c, secrets.HA_OWNER_PASSWORD)) in e.value.hint
    assert not shown_secrets(c, str(e.value), ha)
    capsys.readouterr()
    onboard.setup(c, None)  # a re-run: onboarded, no token of ours: left alone, says how
    assert "haswarm has no token for it" in capsys.readouterr().out


def test_dry_run_and_onboard_false_change_nothing(ha, tmp_path, capsys):
    c = cluster(tmp_path, ha.port)
    onboard.setup(c, None, dryrun=True)
    out = capsys.readouterr().out
    assert "would create the owner account" in out and "would add the MQTT integration" in out
    off = cluster(tmp_path / "off", ha.port, onboard=False)
    onboard.setup(off, None)
    assert "onboarding is left to you" in capsys.readouterr().out
    assert ha.changes() == [] and ha.done == []
    assert secrets.HA_OWNER_PASSWORD not in secrets.generated(off)


def test_a_token_of_an_earlier_home_assistant_is_replaced(ha, tmp_path, capsys):
    """After `doit purge=yes clean` the volume is new: HA wants onboarding again."""
    c = cluster(tmp_path, ha.port)
    secrets.write_private(secrets.token_path(c), "token-of-a-purged-ha")
    onboard.setup(c, None)
    assert secrets.ha_token(c) == ha.llat["haswarm"]
    assert "replacing a token of an earlier Home Assistant" in capsys.readouterr().out


# ---------------------------------------------------------------------------------------------
# doit status


def status_state(c: Cluster) -> str | None:
    """What `doit status` reads of HA's MQTT entry (HA on pi1, 127.0.0.1)."""
    return onboard.mqtt_state(c, "pi1", "127.0.0.1")


def test_status_shows_the_mqtt_integration(ha, tmp_path):
    c = cluster(tmp_path, ha.port)
    assert status_state(c) is None  # no token here
    onboard.setup(c, None)
    assert status_state(c) == "loaded"
    ha.entries[0]["state"] = "setup_retry"
    assert status_state(c) == "setup_retry"
    ha.entries.clear()
    assert status_state(c) == "absent"
    secrets.write_private(secrets.token_path(c), "revoked")
    assert status_state(c) == "token refused"

    node = status.NodeStatus("pi1", "127.0.0.1", reachable=True, http=200)
    st = status.ClusterStatus(cluster=c, nodes=[node], ha_mqtt="absent")
    assert "Home Assistant's MQTT integration: absent" in status.summary(st)
    assert any("MQTT integration is absent, want loaded" in p for p in st.problems())
    st.ha_mqtt = "loaded"
    assert not any("MQTT integration" in p for p in st.problems())
    st.ha_mqtt = None
    assert any("unknown (no Home Assistant token" in line for line in status.summary(st))


def test_status_proves_a_message_from_the_broker_reaches_home_assistant(ha, tmp_path):
    c = cluster(tmp_path, ha.port)
    onboard.setup(c, None)
    broker = FakeBroker(secrets.read(c, "mqtt_homeassistant"), ha.deliver)
    c = c.model_copy(update={"mqtt": c.mqtt.model_copy(update={"port": broker.port})})
    seconds = onboard.mqtt_delivery(c, "pi1", "127.0.0.1", "127.0.0.1")
    assert seconds is not None and seconds < 1
    ha.mqtt_connected = False  # the entry stays "loaded", HA's client is cut from the broker
    assert onboard.mqtt_delivery(c, "pi1", "127.0.0.1", "127.0.0.1", timeout=1) == math.inf
    assert status_state(c) == "loaded"
    broker.password = "another"  # no broker login: cannot tell
    assert onboard.mqtt_delivery(c, "pi1", "127.0.0.1", "127.0.0.1", timeout=1) is None

    node = status.NodeStatus("pi1", "127.0.0.1", reachable=True, http=200)
    st = status.ClusterStatus(cluster=c, nodes=[node], ha_mqtt="loaded", ha_mqtt_delivery=0.25)
    assert ("Home Assistant's MQTT integration: loaded; a message sent to the broker reached it "
            "in 0.2 s") in status.summary(st)
    st.ha_mqtt_delivery = math.inf
    assert any("did NOT reach it within 3 s" in line for line in status.summary(st))


# ---------------------------------------------------------------------------------------------
# Pure parts


def test_parsers_read_home_assistants_shapes():
    assert parse_onboarding([{"step": "user", "done": True},
                             {"step": "core_config", "done": False}]) == {
        "user": True, "core_config": False}
    for bad in ({"user": True}, [{"step": "user"}], "<html>"):
        with pytest.raises(ValueError):
            parse_onboarding(bad)
    listed = [{"entry_id": "a", "domain": "met", "title": "Home", "state": "loaded"},
              {"entry_id": "b", "domain": "mqtt", "title": "mosquitto", "state": "loaded"}]
    assert parse_entries(listed) == [Entry("b", "mosquitto", "loaded")]
    with pytest.raises(ValueError):
        parse_entries({"message": "401: Unauthorized"})


def test_the_keepers_user_is_added_again_when_it_is_gone(ha, tmp_path, capsys):
    c = cluster(tmp_path, ha.port)
    onboard.setup(c, None)
    del ha.users["haswarm-keeper"]  # removed in HA's UI
    capsys.readouterr()
    onboard.setup(c, None)
    assert "add the user 'haswarm-keeper'" in capsys.readouterr().out
    assert ha.users["haswarm-keeper"] == secrets.read(c, secrets.HA_KEEPER_PASSWORD)
    assert plan(Facts({s: True for s in STEPS}, True, [Entry("b", "m", "loaded")], keeper=False),
                "HOW").actions == ["keeper"]


@pytest.mark.parametrize(("steps", "token", "mqtt", "actions", "note"), [
    ({s: False for s in STEPS}, False, None,
     ["owner", "core_config", "analytics", "integration", "mqtt", "keeper"], False),
    ({s: False for s in STEPS}, True, None,  # a token of an earlier HA: onboard anew
     ["owner", "core_config", "analytics", "integration", "mqtt", "keeper"], False),
    ({s: True for s in STEPS}, False, None, [], True),  # by hand: left alone
    ({"user": True, "core_config": False, "analytics": True, "integration": False}, False,
     None, [], True),
    ({s: True for s in STEPS}, True, [], ["mqtt"], False),
    ({s: True for s in STEPS}, True, [Entry("b", "mosquitto", "loaded")], [], False),
    ({"user": True, "core_config": True, "analytics": False, "integration": False}, True,
     [Entry("b", "mosquitto", "setup_retry")], ["analytics", "integration"], False),
])
def test_plan_decision_table(steps, token, mqtt, actions, note):
    p = plan(Facts(steps=steps, token=token, mqtt=mqtt), "HOW")
    assert p.actions == actions
    assert bool(p.notes) == note and all(n.endswith("HOW") for n in p.notes)


def test_owner_password_stays_on_this_computer(tmp_path):
    c = cluster(tmp_path, 8123)
    assert secrets.HA_OWNER_PASSWORD in secrets.generated(c)
    assert secrets.HA_OWNER_PASSWORD not in render.secret_sources(c)  # no Docker secret
    p = secrets.path(c, secrets.HA_OWNER_PASSWORD)
    assert p.stat().st_mode & 0o777 == 0o600 and len(p.read_text().strip()) >= 40


def test_cluster_file_settings(tmp_path):
    import yaml

    from tasks.config import PROJECT_ROOT

    data = yaml.safe_load(LAB_CLUSTER_FILE.read_text())
    data["homeassistant"].update(onboard=False, token_file="my/token")
    p = tmp_path / "cluster.yml"
    p.write_text(yaml.safe_dump(data))
    c = load_cluster(p)
    assert c.homeassistant.onboard is False
    assert secrets.token_path(c) == PROJECT_ROOT / "my" / "token"
    assert load_cluster(LAB_CLUSTER_FILE).homeassistant.onboard is True  # the default
