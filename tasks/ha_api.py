"""Home Assistant's HTTP and websocket API, as haswarm uses it: one client (`HomeAssistantAPI`)
and pure readers of HA's answers.

Every call goes straight to one address (no proxy) with the standard library (websocket-client
for the websocket API); every failure is an `HAError` that names the node, the call and what to
do, with passwords and tokens replaced by ***. The shapes were read in Home Assistant's source
(homeassistant/components/...), the same in 2024.1.6 (the lab's) and 2026.2.3:

  onboarding/views.py, const.py  GET /api/onboarding: [{"step", "done"}] for user, core_config,
                                 analytics, integration; POST /api/onboarding/users (no auth:
                                 client_id, name, username, password, language) -> auth_code;
                                 the other steps need a token; a step already done answers 403;
                                 a step is marked done before the rest of its work (integration:
                                 client_id/redirect_uri and the token's credential checked after)
  auth/__init__.py               POST /auth/token (form: grant_type=authorization_code, code,
                                 client_id) -> access_token; websocket auth/long_lived_access_token
                                 (client_name, lifespan in days; a name once per user)
  auth/indieauth.py              client_id and redirect_uri on the same scheme and host:port
  websocket_api/auth.py          auth_required -> {"type": "auth", "access_token"} -> auth_ok
  config/config_entries.py,      POST /api/config/config_entries/flow {"handler"} and
  helpers/data_entry_flow.py     .../flow/<flow_id> with the step's fields; GET
                                 /api/config/config_entries/entry?domain=D: entries with "state"
  mqtt/config_flow.py            step "broker": broker, port, username, password; an existing
                                 entry aborts with single_instance_allowed
  mqtt/__init__.py               websocket mqtt/subscribe (admin): an event per message HA's
                                 MQTT client receives
  config/auth.py,                websocket config/auth/list (users: id, username, ...),
  config/auth_provider_          config/auth/create (name, group_ids, local_only) -> user.id,
  homeassistant.py               config/auth_provider/homeassistant/create (user_id, username,
                                 password), .../admin_change_password (user_id, password)
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from tasks.errors import HaswarmError

# Onboarding's steps in HA's order (onboarding/const.py STEPS, unchanged 2021-2026).
USER, CORE_CONFIG, ANALYTICS, INTEGRATION = "user", "core_config", "analytics", "integration"
STEPS = (USER, CORE_CONFIG, ANALYTICS, INTEGRATION)
HTTP_TIMEOUT = 60.0  # core_config sets up a few integrations before it answers (2024.1)
STEP_TIMEOUT = 15.0  # an onboarding step: then GET /api/onboarding tells whether it is done

MQTT_KEEPALIVE = 15  # s; see broker_body


class HAError(HaswarmError):
    """Home Assistant refused or failed a call; the message names where and what to do."""


# ---------------------------------------------------------------------------------------------
# HA's answers, read (pure)


@dataclass(frozen=True)
class Entry:
    """One config entry, as GET /api/config/config_entries/entry lists it."""

    entry_id: str
    title: str
    state: str  # loaded | setup_retry | setup_error | not_loaded | ...


def parse_onboarding(data: Any) -> dict[str, bool]:
    """GET /api/onboarding -> {step: done}: `[{"step": "user", "done": true}, ...]`."""
    if not isinstance(data, list) or not all(
            isinstance(x, dict) and isinstance(x.get("step"), str)
            and isinstance(x.get("done"), bool) for x in data):
        raise ValueError(f"unexpected onboarding status {str(data)[:200]!r}")
    return {x["step"]: x["done"] for x in data}


def parse_entries(data: Any, domain: str = "mqtt") -> list[Entry]:
    """GET /api/config/config_entries/entry -> the entries of `domain`."""
    if not isinstance(data, list):
        raise ValueError(f"unexpected config entry list {str(data)[:200]!r}")
    return [Entry(str(e.get("entry_id", "")), str(e.get("title", "")), str(e.get("state", "")))
            for e in data if isinstance(e, dict) and e.get("domain") == domain]


class HomeAssistantAPI:
    """Home Assistant's HTTP and websocket API at one address, straight (no proxy). Every
    error is an HAError naming the node, the call and what to do; secrets never appear."""

    def __init__(self, node: str, address: str, port: int, timeout: float = HTTP_TIMEOUT,
                 hidden: list[str] | None = None, step: str = "ha-onboard") -> None:
        self.node, self.address, self.port, self.timeout = node, address, port, timeout
        self.step = step  # the doit task that calls: errors name it
        self.base = f"http://[{address}]:{port}" if ":" in address else f"http://{address}:{port}"
        self.hidden = [h for h in hidden or [] if h]
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    @property
    def client_id(self) -> str:
        """The OAuth client id haswarm signs in as: HA's own address, as its frontend does."""
        return self.base + "/"

    def hide(self, *values: str) -> None:
        """Never show these values (passwords, tokens) in an error."""
        self.hidden += [v for v in values if v]

    def fail(self, what: str, detail: str, hint: str) -> HAError:
        """An HAError for `what` on this node (secret values replaced by ***)."""
        from tasks.failures import redact

        return HAError(redact(f"{self.step} on {self.node}: {what}: {detail} (Home Assistant at "
                              f"{self.base})", self.hidden), redact(hint, self.hidden))

    def call(self, method: str, path: str, *, token: str | None = None, body: Any = None,
             form: dict[str, str] | None = None,
             timeout: float | None = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body or None). Raises HAError when nothing answers
        within `timeout` (default: this API's)."""
        headers = {"Accept": "application/json"}
        data = None
        if form is not None:
            data = urllib.parse.urlencode(form).encode()
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        elif body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=data, headers=headers, method=method)
        try:
            with self._opener.open(req, timeout=timeout or self.timeout) as resp:
                status, raw = int(resp.status), resp.read()
        except urllib.error.HTTPError as e:
            status, raw = int(e.code), e.read()
        except (OSError, ValueError) as e:
            raise self.fail(f"{method} {path}", f"no answer ({e})",
                            "check that Home Assistant runs (`doit status`) and run "
                            f"`doit {self.step}` again") from None
        try:
            return status, json.loads(raw) if raw.strip() else None
        except ValueError:
            return status, raw.decode(errors="replace")[:300]

    def expect(self, method: str, path: str, ok: tuple[int, ...] = (200,), *,
               hint: str = "", **kw: Any) -> Any:
        """`call`, and an HAError when the status is not one of `ok`."""
        status, data = self.call(method, path, **kw)
        if status not in ok:
            raise self.http_error(method, path, status, data, hint)
        return data

    def http_error(self, method: str, path: str, status: int, data: Any,
                   hint: str = "") -> HAError:
        """The HAError for an unexpected answer: the status, HA's message, what to do."""
        message = data.get("message") if isinstance(data, dict) else data
        return self.fail(f"{method} {path}", f"HTTP {status} {str(message or '')[:300]}",
                         hint or "read Home Assistant's log (`docker service logs "
                                 "NAME_homeassistant` on a manager, NAME the cluster's name) "
                                 f"and run `doit {self.step}` again")

    # -- the calls haswarm makes ------------------------------------------------------------

    def onboarding(self) -> dict[str, bool]:
        """{step: done} (GET /api/onboarding, no auth). A Home Assistant that started with
        every step done registers no onboarding views at all (components/onboarding/
        __init__.py): its 404 means done."""
        status, data = self.call("GET", "/api/onboarding")
        if status == 404:
            return dict.fromkeys(STEPS, True)
        if status != 200:
            raise self.http_error("GET", "/api/onboarding", status, data)
        try:
            return parse_onboarding(data)
        except ValueError as e:
            raise self.fail("GET /api/onboarding", str(e), "is this Home Assistant?") from None

    def entries(self, token: str, domain: str = "mqtt") -> list[Entry]:
        """The config entries of `domain`."""
        data = self.expect("GET", f"/api/config/config_entries/entry?domain={domain}",
                           token=token, hint=TOKEN_HINT)
        try:
            return parse_entries(data, domain)
        except ValueError as e:
            raise self.fail("GET /api/config/config_entries/entry", str(e), TOKEN_HINT) \
                from None

    def create_owner(self, name: str, username: str, password: str, language: str) -> str:
        """Onboarding's user step; returns an access token of the new owner."""
        code = self.expect("POST", "/api/onboarding/users", body={
            "client_id": self.client_id, "name": name, "username": username,
            "password": password, "language": language})
        if not isinstance(code, dict) or not isinstance(code.get("auth_code"), str):
            raise self.fail("POST /api/onboarding/users", f"no auth_code in {code!r}",
                            "report this with the Home Assistant version")
        tokens = self.expect("POST", "/auth/token", form={
            "grant_type": "authorization_code", "code": code["auth_code"],
            "client_id": self.client_id})
        if not isinstance(tokens, dict) or not isinstance(tokens.get("access_token"), str):
            raise self.fail("POST /auth/token", "no access_token in the answer",
                            "report this with the Home Assistant version")
        self.hide(tokens["access_token"], str(tokens.get("refresh_token") or ""))
        return tokens["access_token"]

    def finish_step(self, step: str, token: str) -> None:
        """POST one onboarding step after the user step. HA marks a step done before the rest
        of its work: the integration step then checks the token's credential (a long-lived
        token has none: 403) and the redirect uri (400); core_config sets up a few integrations
        (2024.1: an error there is a 500). So GET /api/onboarding decides, not the answer."""
        body = {"client_id": self.client_id, "redirect_uri": self.base + "/?auth_callback=1"} \
            if step == INTEGRATION else {}
        path = f"/api/onboarding/{step}"
        try:
            status, data = self.call("POST", path, token=token, body=body, timeout=STEP_TIMEOUT)
        except HAError:
            # No answer in time: 2024.1's core_config waits for integrations that look for
            # the Internet. The step counts as done once HA has marked it.
            if self.onboarding().get(step):
                return
            raise
        if status == 200 or self.onboarding().get(step):
            return
        message = data.get("message") if isinstance(data, dict) else data
        hint = TOKEN_HINT if status == 401 else ("finish onboarding in Home Assistant's UI, "
                                                 f"or run `doit {self.step}` again")
        raise self.fail(f"POST {path}", f"HTTP {status} {str(message or '')[:300]}; the step is "
                        "not done", hint)

    @contextlib.contextmanager
    def websocket(self, token: str, what: str) -> Iterator[Any]:
        """An authenticated connection to HA's websocket API (a websocket-client WebSocket):
        HA sends auth_required, we send auth, HA answers auth_ok (websocket_api/auth.py)."""
        websocket = _websocket_client()
        host = f"[{self.address}]" if ":" in self.address else self.address
        try:
            ws = websocket.create_connection(f"ws://{host}:{self.port}/api/websocket",
                                             timeout=self.timeout, http_no_proxy=[self.address])
        except (OSError, websocket.WebSocketException) as e:
            raise self.fail(what, f"cannot connect ({e})", "run `doit status`") from None
        try:
            json.loads(ws.recv())
            ws.send(json.dumps({"type": "auth", "access_token": token}))
            if (msg := json.loads(ws.recv())).get("type") != "auth_ok":
                raise self.fail(what, f"authentication refused ({msg.get('type')})",
                                TOKEN_HINT)
            yield ws
        except (OSError, ValueError, websocket.WebSocketException) as e:
            raise self.fail(what, f"the connection failed ({e})", "run `doit status`") from None
        finally:
            ws.close()

    def long_lived_token(self, access_token: str, name: str, days: int) -> str:
        """A long-lived access token of the signed-in user, over the websocket API."""
        what = "websocket auth/long_lived_access_token"
        with self.websocket(access_token, what) as ws:
            ws.send(json.dumps({"id": 1, "type": "auth/long_lived_access_token",
                                "client_name": name, "lifespan": days}))
            msg = _result(ws, 1)
        if not msg.get("success") or not isinstance(msg.get("result"), str):
            error = (msg.get("error") or {}).get("message", msg)
            raise self.fail(what, f"refused: {error}",
                            f"a token named {name!r} may exist already: delete it in the "
                            "owner's profile (Security) and run the task again")
        self.hide(msg["result"])
        return msg["result"]

    def mqtt_delivery(self, token: str, publish: Callable[[str, str], None],
                      timeout: float = 3.0) -> float | None:
        """Seconds until a message that `publish(topic, payload)` sends to the broker reaches
        Home Assistant's MQTT client (websocket `mqtt/subscribe`, for admins); None when none
        did within `timeout`. Published again every 0.3 s: HA subscribes a moment later."""
        websocket = _websocket_client()
        topic = f"haswarm/status/{uuid.uuid4().hex[:12]}"
        with self.websocket(token, "websocket mqtt/subscribe") as ws:
            ws.send(json.dumps({"id": 1, "type": "mqtt/subscribe", "topic": topic}))
            if not _result(ws, 1).get("success"):
                raise self.fail("websocket mqtt/subscribe", "refused", TOKEN_HINT)
            ws.settimeout(0.3)
            started = time.monotonic()
            while time.monotonic() - started < timeout:
                publish(topic, "haswarm status")
                try:
                    msg = json.loads(ws.recv())
                except websocket.WebSocketTimeoutException:
                    continue
                if msg.get("type") == "event" and (msg.get("event") or {}).get("topic") == topic:
                    return time.monotonic() - started
        return None

    def _ws_command(self, token: str, what: str, command: dict[str, Any]) -> Any:
        """One websocket command's result; an HAError when HA refuses it."""
        with self.websocket(token, what) as ws:
            ws.send(json.dumps({"id": 1, **command}))
            msg = _result(ws, 1)
        if not msg.get("success"):
            raise self.fail(what, f"refused: {(msg.get('error') or {}).get('message', msg)}",
                            TOKEN_HINT)
        return msg.get("result")

    def usernames(self, token: str) -> dict[str, str]:
        """{login name: user id} of HA's users with a login (websocket config/auth/list)."""
        users = self._ws_command(token, "websocket config/auth/list", {"type": "config/auth/list"})
        return {u["username"]: u["id"] for u in users or [] if u.get("username")}

    def add_admin(self, token: str, username: str, password: str) -> None:
        """An administrator that logs in only from HA's own networks (local_only), with a
        login: config/auth/create, then config/auth_provider/homeassistant/create; its password
        set again (admin_change_password) when the user exists."""
        self.hide(password)
        if (user_id := self.usernames(token).get(username)) is None:
            user = self._ws_command(token, "websocket config/auth/create", {
                "type": "config/auth/create", "name": username, "group_ids": ["system-admin"],
                "local_only": True})
            self._ws_command(token, "websocket config/auth_provider/homeassistant/create", {
                "type": "config/auth_provider/homeassistant/create",
                "user_id": user["user"]["id"], "username": username, "password": password})
        else:
            self._ws_command(token, "websocket admin_change_password", {
                "type": "config/auth_provider/homeassistant/admin_change_password",
                "user_id": user_id, "password": password})

    def add_mqtt(self, token: str, fields: dict[str, Any]) -> str:
        """Configure the MQTT integration through the config flow, with `fields` for its
        `broker` step; returns what happened."""
        self.hide(str(fields.get("password", "")))
        broker = f"{fields.get('broker')}:{fields.get('port')} as {fields.get('username')}"
        path = "/api/config/config_entries/flow"
        # Advanced options shown: the broker form then offers the keepalive (see broker_body).
        result = self.expect("POST", path, token=token,
                             body={"handler": "mqtt", "show_advanced_options": True},
                             hint=TOKEN_HINT)
        asked = False  # advanced options asked for already
        for _ in range(5):
            kind = result.get("type") if isinstance(result, dict) else None
            if kind == "create_entry":
                return f"MQTT integration added (broker {broker})"
            if kind == "abort":
                if result.get("reason") in ("single_instance_allowed", "already_configured"):
                    return "MQTT integration present already"
                raise self.fail("MQTT config flow", f"aborted: {result.get('reason')}",
                                "add the MQTT integration in Home Assistant's UI")
            flow = f"{path}/{result.get('flow_id')}"
            if kind == "menu" and "broker" in (result.get("menu_options") or []):
                result = self.expect("POST", flow, token=token, body={"next_step_id": "broker"})
            elif kind == "form" and result.get("step_id") == "broker" and not result.get("errors"):
                body = broker_body(result, fields, advanced_asked=asked)
                asked = asked or "advanced_options" in body
                result = self.expect("POST", flow, token=token, body=body)
            elif kind == "form" and result.get("errors"):
                self.call("DELETE", flow, token=token)
                raise self.fail("MQTT config flow", f"Home Assistant could not use the broker "
                                f"{broker}: {result.get('errors')}",
                                "check that Mosquitto runs and accepts that user (`doit "
                                f"status`), then run `doit {self.step}` again")
            else:
                raise self.fail("MQTT config flow", f"unexpected step {str(result)[:300]}",
                                "add the MQTT integration in Home Assistant's UI")
        raise self.fail("MQTT config flow", "did not finish in 5 steps",
                        "add the MQTT integration in Home Assistant's UI")


def broker_body(form: dict[str, Any], fields: dict[str, Any], advanced_asked: bool = False
                ) -> dict[str, Any]:
    """What to post to the MQTT flow's `broker` form: `fields`; where the form offers them,
    the advanced options and then a keepalive of MQTT_KEEPALIVE s. HA's client notices a dead
    broker only by its keepalive (a broker's node that loses power sends no FIN): 60 s by
    default, so about 90 s without a message after such a fault; 15 s, the least HA accepts,
    makes that 15-30 s. HA then reconnects 10 s later (its fixed RECONNECT_INTERVAL)."""
    names = {f.get("name") for f in form.get("data_schema") or [] if isinstance(f, dict)}
    if "keepalive" in names:
        return {**fields, "keepalive": MQTT_KEEPALIVE}
    if "advanced_options" in names and not advanced_asked:
        return {**fields, "advanced_options": True}
    return dict(fields)


TOKEN_HINT = ("the token may be revoked or not an administrator's: put a long-lived access "
               "token of an HA administrator in the token file (see `homeassistant.token_file`)")


def _websocket_client() -> Any:
    """The websocket-client module (imported when needed: `doit list` stays fast)."""
    try:
        import websocket
    except ImportError:
        raise HAError("haswarm needs websocket-client on this computer",
                      "pip install 'websocket-client>=1.6' (or run ./install.sh)") from None
    return websocket


def _result(ws: Any, msg_id: int) -> dict[str, Any]:
    """The websocket API's `result` message for command `msg_id` (events before it skipped)."""
    while not ((msg := json.loads(ws.recv())).get("id") == msg_id
               and msg.get("type") == "result"):
        pass
    return msg
