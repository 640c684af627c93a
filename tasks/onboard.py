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
     Discovery is on, HA's default (2024.1 writes it into the entry's data; 2026.2 reads the
     default from the entry's options);
  5. the user `haswarm-keeper`: an administrator that logs in from HA's own networks only, with
     the generated password secrets/<cluster>/ha_keeper_password, which the stack passes to HA's
     container as a Docker secret. The lock keeper there logs in as it to reload the MQTT
     integration once a broker answers again (stack/haswarm-lock.py.j2).

As every step of haswarm: facts first (GET /api/onboarding, the steps and whether each is done;
the config entries of domain mqtt when a token is at hand), then a pure `plan`, then the calls
(`apply_ops`). A re-run finds everything done and says "nothing to do". Onboarding done by
someone else (its user step done, no token here) is left alone: setup says how to add the MQTT
integration by hand, or how to hand haswarm a token. With `homeassistant.onboard: false`
nothing is done. No `.storage` file is ever written: their format changes between releases.

HA's API, and the shapes of its answers as read in HA's source (2024.1.6 and 2026.2.3), are in
tasks/ha_api.py.

Where HA is reached: from this computer, at the node where it answers HTTP on
`homeassistant.port` (`stack_observe.probe_http`, as `doit stack` and `doit status` do).

For `doit status`: `mqtt_state` (the MQTT entry's state) and `mqtt_delivery` (does a message
sent to the broker reach HA: websocket `mqtt/subscribe`, the same in both releases).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tasks import secrets
from tasks.config import Cluster
from tasks.errors import HaswarmError
from tasks.ha_api import STEPS, USER, Entry, HAError, HomeAssistantAPI, parse_entries
from tasks.ops import Op, apply_ops, say

if TYPE_CHECKING:
    from tasks.remote import Remote

STEP = "ha-onboard"
# The plan's actions besides onboarding's steps: the owner with haswarm's token, MQTT, the
# keeper's user.
OWNER, MQTT_ACTION, KEEPER = "owner", "mqtt", "keeper"
KEEPER_LOGIN = secrets.HA_KEEPER_LOGIN
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
HA_WAIT = 120.0  # seconds to wait for Home Assistant to answer HTTP at all


# ---------------------------------------------------------------------------------------------
# Facts and the plan (pure)


@dataclass(frozen=True)
class Facts:
    """What Home Assistant says now."""

    steps: dict[str, bool]  # onboarding step -> done
    token: bool  # a long-lived access token is at hand (ours or the user's)
    mqtt: list[Entry] | None  # config entries of domain mqtt; None: not read (no token)
    keeper: bool | None = None  # the keeper's user exists; None: not read (no token)

    @property
    def missing(self) -> list[str]:
        """The onboarding steps not done yet, in HA's order."""
        return [s for s, done in self.steps.items() if not done]


@dataclass(frozen=True)
class Plan:
    """What to do, in order ("owner", onboarding steps, "mqtt"), and what to tell the user."""

    actions: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def plan(facts: Facts, manual: str) -> Plan:
    """The decision table (with `homeassistant.onboard: true`; false does nothing). `manual`:
    how to add the MQTT integration by hand (`manual_mqtt`).

    | user step | token | then                                                          |
    |-----------|-------|---------------------------------------------------------------|
    | not done  | any   | owner + token, the other steps left, MQTT, keeper             |
    | done      | none  | nothing (onboarded by someone else); say how to add MQTT      |
    | done      | yes   | the steps left; MQTT unless an entry exists; keeper unless it |
    |           |       | exists                                                        |
    """
    if not facts.steps.get(USER, False):
        return Plan([OWNER, *(s for s in facts.missing if s != USER), MQTT_ACTION, KEEPER])
    if not facts.token:
        return Plan(notes=["Home Assistant is onboarded and haswarm has no token for it "
                           "(onboarded by hand, or a run stopped before it stored one): left as "
                           "it is. " + manual])
    actions = list(facts.missing)
    if not facts.mqtt:
        actions.append(MQTT_ACTION)
    if facts.keeper is False:
        actions.append(KEEPER)
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


# ---------------------------------------------------------------------------------------------
# The step


def read_facts(api: HomeAssistantAPI, token: str | None) -> Facts:
    """Onboarding's steps; the MQTT entries when a token is at hand."""
    steps = api.onboarding()
    known = token and steps.get(USER)
    mqtt = api.entries(token) if known else None
    keeper = KEEPER_LOGIN in api.usernames(token) if known else None
    return Facts(steps=steps, token=bool(token), mqtt=mqtt, keeper=keeper)


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
            session.token = api.long_lived_token(session.access, TOKEN_NAME, TOKEN_DAYS)
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
        fields = broker_fields(secrets.read(c, f"mqtt_{MQTT_USER}"))
        say(api.node, f"{STEP}: {api.add_mqtt(token, fields)}")

    def keeper() -> None:
        api.add_admin(session.token or "", KEEPER_LOGIN,
                      secrets.read(c, secrets.HA_KEEPER_PASSWORD))

    described: dict[str, tuple[str, Callable[[], None]]] = {
        KEEPER: (f"add the user {KEEPER_LOGIN!r} (an administrator that logs in from Home "
                 "Assistant's own networks only; password in "
                 f"{secrets.path(c, secrets.HA_KEEPER_PASSWORD)}), for the keeper that "
                 "reloads the MQTT integration after a failover", keeper),
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
    """Seconds a message published to the broker at `broker` took to reach Home Assistant at
    `address`: proof that HA's MQTT client is connected (an
    entry "loaded" is not: HA keeps it loaded and reconnects). math.inf: none arrived within
    `timeout`; None: it could not be tried (no token, no broker login, no websocket).
    Published as the `homeassistant` user: the only one the ACL lets write anywhere."""
    from tasks.mqtt_probe import mqtt_connack, mqtt_publish

    token = secrets.ha_token(c)
    user = MQTT_USER
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
