"""Home Assistant's onboarding and its MQTT integration, done through HA's own HTTP API.

`doit ha-onboard` (part of `doit setup`, after `stack`: Home Assistant answers) does what a
person does in HA's first-run wizard, then adds the MQTT integration HA removed from YAML:

  1. the owner account: POST /api/onboarding/users (no auth until it is done) with the
     generated password in secrets/<cluster>/ha_owner_password; HA answers an auth code, which
     /auth/token exchanges for an access token;
  2. a long-lived access token for haswarm's own checks (status, drill, tests), made over the
     websocket API (`auth/long_lived_access_token`) and stored 0600 (secrets/<cluster>/ha_token,
     or `homeassistant.token_file`);
  3. the remaining onboarding steps: core_config, analytics, integration;
  4. the MQTT integration through the config-flow API (handler `mqtt`, step `broker`): the
     broker as Home Assistant reaches it inside the stack, the `homeassistant` MQTT user.
     Discovery is on: HA's default (in the entry's data up to 2025, its options since).

As every step of haswarm: facts first (GET /api/onboarding, the steps and whether each is done;
the config entries of domain mqtt when a token is at hand), then a pure `plan`, then the calls
(`apply_ops`). A re-run finds everything done and says "nothing to do". Onboarding done by
someone else (its user step done, no token here) is left alone: setup says how to add the MQTT
integration by hand, or how to hand haswarm a token. With `homeassistant.onboard: false`
nothing is done. No `.storage` file is ever written: their format changes between releases.

Shapes read in Home Assistant's source (homeassistant/components/...), the same in 2024.1.6 (the
lab's) and 2026.2.3: onboarding/views.py and const.py (steps user, core_config, analytics,
integration; a step already done answers 403; the integration step marks itself done before it
checks client_id/redirect_uri and the token's credential), auth/__init__.py (/auth/token form
fields; `auth/long_lived_access_token` with client_name and lifespan in days), auth/indieauth.py
(client_id and redirect_uri on the same scheme and host:port are valid), config/config_entries.py
and helpers/data_entry_flow.py (flow start and step bodies, the entry list's `state`),
mqtt/config_flow.py (step `broker`: broker, port, username, password; `single_instance_allowed`).

Where HA is reached: from this computer, at the node where it answers HTTP on
`homeassistant.port` (`stack_observe.probe_http`, as `doit stack` and `doit status` do).

For `doit status`: `mqtt_state` (the MQTT entry's state) and `mqtt_delivery` (does a message
sent to the broker reach HA: websocket `mqtt/subscribe`, the same in both releases).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks import secrets
from tasks.config import Cluster
from tasks.errors import HaswarmError
from tasks.ops import Op, apply_ops, say

if TYPE_CHECKING:
    from tasks.remote import Remote

STEP = "ha-onboard"
# Onboarding's steps in HA's order (onboarding/const.py STEPS, unchanged 2021-2026).
USER, CORE_CONFIG, ANALYTICS, INTEGRATION = "user", "core_config", "analytics", "integration"
STEPS = (USER, CORE_CONFIG, ANALYTICS, INTEGRATION)
# The plan's other actions: the owner account with haswarm's token, the MQTT integration.
OWNER, MQTT_ACTION = "owner", "mqtt"
# Home Assistant reaches the broker inside the stack, on the overlay network: the service name
# (swarm's DNS gives the running tasks) and the container's port, not the published one. A
# waiting broker (standby) has no listener, so a connection there is refused at once and the
# client tries the next address.
MQTT_BROKER = "mosquitto"
MQTT_BROKER_PORT = 1883
MQTT_USER = "homeassistant"
OWNER_LOGIN = "owner"  # the owner's login and display name; its password is generated
LANGUAGE = "en"  # the owner's language: HA names the default areas in it
TOKEN_NAME = "haswarm"  # the long-lived token's name in the owner's profile (unique per user)
TOKEN_DAYS = 3650
HTTP_TIMEOUT = 60.0  # core_config sets up a few integrations before it answers (2024.1)
HA_WAIT = 120.0  # seconds to wait for Home Assistant to answer HTTP at all


class HAError(HaswarmError):
    """Home Assistant refused or failed a call; the message names where and what to do."""


# ---------------------------------------------------------------------------------------------
# Facts and their parsers (pure)


@dataclass(frozen=True)
class Entry:
    """One config entry, as GET /api/config/config_entries/entry lists it."""

    entry_id: str
    title: str
    state: str  # loaded | setup_retry | setup_error | not_loaded | ...


@dataclass(frozen=True)
class Facts:
    """What Home Assistant says now."""

    steps: dict[str, bool]  # onboarding step -> done
    token: bool  # a long-lived access token is at hand (ours or the user's)
    mqtt: list[Entry] | None  # config entries of domain mqtt; None: not read (no token)

    @property
    def missing(self) -> list[str]:
        """The onboarding steps not done yet, in HA's order."""
        return [s for s, done in self.steps.items() if not done]


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


# ---------------------------------------------------------------------------------------------
# The plan (pure)


@dataclass(frozen=True)
class Plan:
    """What to do, in order ("owner", onboarding steps, "mqtt"), and what to tell the user."""

    actions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan(facts: Facts, manual: str) -> Plan:
    """The decision table (with `homeassistant.onboard: true`; false does nothing). `manual`:
    how to add the MQTT integration by hand (`manual_mqtt`).

    | user step | token | then                                                     |
    |-----------|-------|----------------------------------------------------------|
    | not done  | any   | owner + token, the other steps left, MQTT                |
    | done      | none  | nothing (onboarded by someone else); say how to add MQTT |
    | done      | yes   | the steps left; MQTT unless an entry exists              |
    """
    if not facts.steps.get(USER, False):
        return Plan([OWNER, *(s for s in facts.missing if s != USER), MQTT_ACTION])
    if not facts.token:
        return Plan(notes=["Home Assistant is onboarded and haswarm has no token for it "
                           "(onboarded by hand, or a run stopped before it stored one): left as "
                           "it is. " + manual])
    actions = list(facts.missing)
    if not facts.mqtt:
        actions.append(MQTT_ACTION)
    return Plan(actions)


def manual_mqtt(c: Cluster) -> str:
    """How to add the MQTT integration by hand, or let haswarm do it."""
    return (f"To add the MQTT integration yourself: Settings > Devices & services > Add "
            f"integration > MQTT; broker {MQTT_BROKER}, port {MQTT_BROKER_PORT}, user "
            f"{MQTT_USER}, password: the content of {secrets.path(c, f'mqtt_{MQTT_USER}')}. "
            "Or let haswarm do it: create a long-lived access token as an administrator "
            f"(your profile > Security), save it in {secrets.token_path(c)} (mode 0600; or "
            "set homeassistant.token_file) and run `doit ha-onboard` again.")


def broker_fields(password: str) -> dict[str, Any]:
    """The MQTT flow's `broker` step input: the broker as HA reaches it in the stack."""
    return {"broker": MQTT_BROKER, "port": MQTT_BROKER_PORT, "username": MQTT_USER,
            "password": password}


# ---------------------------------------------------------------------------------------------
# Talking to Home Assistant


class HomeAssistantAPI:
    """Home Assistant's HTTP and websocket API at one address, straight (no proxy). Every
    error is an HAError naming the node, the call and what to do; secrets never appear."""

    def __init__(self, node: str, address: str, port: int, timeout: float = HTTP_TIMEOUT,
                 hidden: list[str] | None = None) -> None:
        self.node, self.address, self.port, self.timeout = node, address, port, timeout
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

        return HAError(redact(f"{STEP} on {self.node}: {what}: {detail} (Home Assistant at "
                              f"{self.base})", self.hidden), redact(hint, self.hidden))

    def call(self, method: str, path: str, *, token: str | None = None, body: Any = None,
             form: dict[str, str] | None = None) -> tuple[int, Any]:
        """(HTTP status, decoded JSON body or None). Raises HAError when nothing answers."""
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
            with self._opener.open(req, timeout=self.timeout) as resp:
                status, raw = int(resp.status), resp.read()
        except urllib.error.HTTPError as e:
            status, raw = int(e.code), e.read()
        except (OSError, ValueError) as e:
            raise self.fail(f"{method} {path}", f"no answer ({e})",
                            "check that Home Assistant runs (`doit status`) and run "
                            f"`doit {STEP}` again") from None
        try:
            return status, json.loads(raw) if raw.strip() else None
        except ValueError:
            return status, raw.decode(errors="replace")[:300]

    def expect(self, method: str, path: str, ok: tuple[int, ...] = (200,), *,
               hint: str = "", **kw: Any) -> Any:
        """`call`, and an HAError when the status is not one of `ok`."""
        status, data = self.call(method, path, **kw)
        if status not in ok:
            message = data.get("message") if isinstance(data, dict) else data
            raise self.fail(f"{method} {path}", f"HTTP {status} {str(message or '')[:300]}",
                            hint or "read Home Assistant's log (`docker service logs "
                                    "NAME_homeassistant` on a manager, NAME the cluster's name) "
                                    f"and run `doit {STEP}` again")
        return data

    # -- the calls haswarm makes ------------------------------------------------------------

    def onboarding(self) -> dict[str, bool]:
        """{step: done} (GET /api/onboarding, no auth)."""
        data = self.expect("GET", "/api/onboarding")
        try:
            return parse_onboarding(data)
        except ValueError as e:
            raise self.fail("GET /api/onboarding", str(e), "is this Home Assistant?") from None

    def entries(self, token: str, domain: str = "mqtt") -> list[Entry]:
        """The config entries of `domain`."""
        data = self.expect("GET", f"/api/config/config_entries/entry?domain={domain}",
                           token=token, hint=_TOKEN_HINT)
        try:
            return parse_entries(data, domain)
        except ValueError as e:
            raise self.fail("GET /api/config/config_entries/entry", str(e), _TOKEN_HINT) \
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
        status, data = self.call("POST", path, token=token, body=body)
        if status == 200 or self.onboarding().get(step):
            return
        message = data.get("message") if isinstance(data, dict) else data
        raise self.fail(f"POST {path}", f"HTTP {status} {str(message or '')[:300]}; the step is "
                        "not done", _TOKEN_HINT if status == 401 else
                        f"finish onboarding in Home Assistant's UI, or run `doit {STEP}` again")

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
                                _TOKEN_HINT)
            yield ws
        except (OSError, ValueError, websocket.WebSocketException) as e:
            raise self.fail(what, f"the connection failed ({e})", "run `doit status`") from None
        finally:
            ws.close()

    def long_lived_token(self, access_token: str, name: str = TOKEN_NAME,
                         days: int = TOKEN_DAYS) -> str:
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
                raise self.fail("websocket mqtt/subscribe", "refused", _TOKEN_HINT)
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

    def add_mqtt(self, token: str, password: str) -> str:
        """Configure the MQTT integration through the config flow; returns what happened."""
        self.hide(password)
        path = "/api/config/config_entries/flow"
        result = self.expect("POST", path, token=token, body={"handler": "mqtt"},
                             hint=_TOKEN_HINT)
        for _ in range(5):
            kind = result.get("type") if isinstance(result, dict) else None
            if kind == "create_entry":
                return f"MQTT integration added (broker {MQTT_BROKER}:{MQTT_BROKER_PORT})"
            if kind == "abort":
                if result.get("reason") in ("single_instance_allowed", "already_configured"):
                    return "MQTT integration present already"
                raise self.fail("MQTT config flow", f"aborted: {result.get('reason')}",
                                "add the MQTT integration in Home Assistant's UI")
            flow = f"{path}/{result.get('flow_id')}"
            if kind == "menu" and "broker" in (result.get("menu_options") or []):
                result = self.expect("POST", flow, token=token, body={"next_step_id": "broker"})
            elif kind == "form" and result.get("step_id") == "broker" and not result.get("errors"):
                result = self.expect("POST", flow, token=token, body=broker_fields(password))
            elif kind == "form" and result.get("errors"):
                self.call("DELETE", flow, token=token)
                raise self.fail("MQTT config flow", f"Home Assistant could not use the broker "
                                f"{MQTT_BROKER}:{MQTT_BROKER_PORT} as {MQTT_USER}: "
                                f"{result.get('errors')}",
                                "check that Mosquitto runs and accepts that user (`doit "
                                f"status`), then run `doit {STEP}` again")
            else:
                raise self.fail("MQTT config flow", f"unexpected step {str(result)[:300]}",
                                "add the MQTT integration in Home Assistant's UI")
        raise self.fail("MQTT config flow", "did not finish in 5 steps",
                        "add the MQTT integration in Home Assistant's UI")


_TOKEN_HINT = ("the token may be revoked or not an administrator's: put a long-lived access "
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


# ---------------------------------------------------------------------------------------------
# The step


def read_facts(api: HomeAssistantAPI, token: str | None) -> Facts:
    """Onboarding's steps; the MQTT entries when a token is at hand."""
    steps = api.onboarding()
    mqtt = api.entries(token) if token and steps.get(USER) else None
    return Facts(steps=steps, token=bool(token), mqtt=mqtt)


@dataclass
class _Session:
    """Tokens gathered while the plan runs (the owner's step makes them)."""

    access: str | None = None  # a short-lived access token (has the owner's credential)
    token: str | None = None  # the long-lived one


def _ops(c: Cluster, api: HomeAssistantAPI, actions: list[str], session: _Session,
         replaced: bool) -> list[Op]:
    """The plan's actions as Ops (each a call made when applied), with what each says."""
    where = secrets.token_path(c)

    def owner() -> None:
        password = secrets.read(c, secrets.HA_OWNER_PASSWORD)
        api.hide(password)
        session.access = api.create_owner(OWNER_LOGIN, OWNER_LOGIN, password, LANGUAGE)
        try:
            session.token = api.long_lived_token(session.access)
            secrets.write_private(where, session.token)
        except (HAError, OSError) as e:  # the owner exists now: a re-run sees "onboarded"
            message = e.message if isinstance(e, HAError) else f"cannot write {where}: {e}"
            raise HAError(message, f"the owner exists: log in as "
                          f"{OWNER_LOGIN!r} (password in "
                          f"{secrets.path(c, secrets.HA_OWNER_PASSWORD)}), create a long-lived "
                          f"token (profile > Security), save it in {where} and run "
                          f"`doit {STEP}` again") from None

    def step(name: str) -> Callable[[], None]:
        return lambda: api.finish_step(name, session.access or session.token or "")

    def mqtt() -> None:
        token = session.token or ""
        if api.entries(token):
            say(api.node, f"{STEP}: MQTT integration present already")
            return
        say(api.node, f"{STEP}: {api.add_mqtt(token, secrets.read(c, f'mqtt_{MQTT_USER}'))}")

    described: dict[str, tuple[str, Callable[[], None]]] = {
        OWNER: (f"create the owner account {OWNER_LOGIN!r} (password in "
                f"{secrets.path(c, secrets.HA_OWNER_PASSWORD)}) and a long-lived token for "
                f"haswarm ({where}" + (", replacing a token of an earlier Home Assistant)"
                                       if replaced else ")"), owner),
        MQTT_ACTION: (f"add the MQTT integration (broker {MQTT_BROKER}:{MQTT_BROKER_PORT}, "
                      f"user {MQTT_USER}, discovery on)", mqtt),
        **{s: (f"finish onboarding step {s}", step(s)) for s in STEPS if s != USER},
    }
    return [Op(described[a][0], call=lambda _r, f=described[a][1]: f()) for a in actions]


def setup(c: Cluster, r: Remote, dryrun: bool = False) -> dict[str, Any]:
    """Onboard Home Assistant and add its MQTT integration (only what is not done)."""
    from tasks.stack_observe import probe_http

    if not c.homeassistant.onboard:
        say(c.nodes[0], f"{STEP}: homeassistant.onboard is false: onboarding is left to you. "
            + manual_mqtt(c))
        return {"onboard": False}
    try:
        name, _ = probe_http(c, c.homeassistant.port, 5.0 if dryrun else HA_WAIT)
    except HaswarmError:
        if not dryrun:
            raise
        say(c.nodes[0], f"{STEP}: Home Assistant does not answer yet: would onboard it then")
        return {}
    node = c.node(name)
    token = secrets.ha_token(c)
    api = HomeAssistantAPI(node.name, node.address, c.homeassistant.port,
                           hidden=secrets.secret_values(c))
    facts = read_facts(api, token)
    todo = plan(facts, manual_mqtt(c))
    session = _Session(token=token)
    replaced = OWNER in todo.actions and secrets.token_path(c).exists()
    apply_ops(r, node, STEP, _ops(c, api, todo.actions, session, replaced), dryrun=dryrun)
    for note in todo.notes:
        say(node, f"{STEP}: {note}")
    if dryrun or not todo.actions:
        return {"via": node.name, "onboarded": not facts.missing}
    left = [s for s, done in api.onboarding().items() if not done]
    if left:
        raise api.fail("onboarding", f"steps still not done: {', '.join(left)}",
                       "finish onboarding in Home Assistant's UI")
    states = [e.state for e in api.entries(session.token or "")]
    say(node, f"{STEP}: onboarding done; MQTT integration {'/'.join(states) or 'absent'}"
        + ("" if states == ["loaded"] else " (want loaded: see Home Assistant's log, Settings > "
           "System > Logs, and `doit status`)"))
    return {"via": node.name, "onboarded": True, "mqtt": states}


def clean(c: Cluster, r: Remote, dryrun: bool) -> None:
    """Nothing to undo: onboarding, the owner and the MQTT entry are Home Assistant's data."""
    say(c.nodes[0], f"{STEP} (clean): the owner account, onboarding and the MQTT integration "
        "live in Home Assistant's config on the volume (user data): kept; "
        f"{secrets.token_path(c)} is kept with the other secrets")


# ---------------------------------------------------------------------------------------------
# For `doit status`


def mqtt_state(c: Cluster, node: str, address: str, timeout: float = 3.0) -> str | None:
    """The state of HA's MQTT entry ("loaded" when it runs), "absent", "token refused"; None
    when unknown (no token here, or HA does not answer)."""
    token = secrets.ha_token(c)
    if not token:
        return None
    api = HomeAssistantAPI(node, address, c.homeassistant.port, timeout=timeout)
    try:
        status, data = api.call("GET", "/api/config/config_entries/entry?domain=mqtt",
                                token=token)
    except HAError:
        return None
    if status in (401, 403):
        return "token refused"
    try:
        entries = parse_entries(data) if status == 200 else None
    except ValueError:
        return None
    if entries is None:
        return None
    return "/".join(e.state for e in entries) or "absent"


def mqtt_delivery(c: Cluster, node: str, address: str, broker: str,
                  timeout: float = 3.0) -> float | None:
    """Seconds a message published to the broker at `broker` (as the stack's healthcheck user)
    took to reach Home Assistant at `address`: proof that HA's MQTT client is connected (an
    entry "loaded" is not: HA keeps it loaded and reconnects). math.inf: none arrived within
    `timeout`; None: it could not be tried (no token, no broker login, no websocket)."""
    from tasks.mqtt_probe import mqtt_connack, mqtt_publish

    token = secrets.ha_token(c)
    user = secrets.HEALTHCHECK_MQTT_USER
    try:
        password = secrets.read(c, f"mqtt_{user}")
    except OSError:
        return None
    if not token or mqtt_connack(broker, c.mqtt.port, 1.5, user, password) != 0:
        return None

    def publish(topic: str, payload: str) -> None:
        mqtt_publish(broker, c.mqtt.port, user, password, topic, payload, timeout=1.0)

    try:
        api = HomeAssistantAPI(node, address, c.homeassistant.port, timeout=timeout)
        seconds = api.mqtt_delivery(token, publish, timeout)
    except HAError:
        return None
    return math.inf if seconds is None else seconds


def task_ha_onboard() -> dict[str, Any]:
    """Onboard Home Assistant (owner, token) and add its MQTT integration, once."""
    from tasks.config import current
    from tasks.ops import remote_task

    c = current()
    task = remote_task(c, STEP, None, task_ha_onboard.__doc__ or "", setup, clean,
                       task_dep=["secrets", "stack"])
    return {**task, "basename": STEP}
