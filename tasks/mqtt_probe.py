"""A broker's first answer, without a client library: one MQTT 3.1.1 CONNECT, its CONNACK; and
one QoS 0 message published the same way."""

from __future__ import annotations

import socket
import time


def mqtt_connack(host: str, port: int, timeout: float = 1.5, user: str | None = None,
                 password: str | None = None) -> int | None:
    """Send an MQTT 3.1.1 CONNECT (anonymous unless `user`) and return the CONNACK return code
    (0 accepted, 5 not authorized...: either way a broker answered); None when none did."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            code = _connect(s, user, password)
            if code == 0:
                s.sendall(_DISCONNECT)
            return code
    except OSError:
        return None


def mqtt_publish(host: str, port: int, user: str, password: str, topic: str, payload: str,
                 timeout: float = 1.5) -> bool:
    """Log in and publish one message with QoS 0, not retained; whether the broker took the
    login (a QoS 0 message is not acknowledged)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            if _connect(s, user, password) != 0:
                return False
            body = _mqtt_string(topic) + payload.encode()
            s.sendall(bytes([0x30]) + _varint(len(body)) + body + _DISCONNECT)
            return True
    except OSError:
        return False


_DISCONNECT = bytes([0xE0, 0])


def _connect(s: socket.socket, user: str | None, password: str | None) -> int | None:
    """CONNECT on socket `s`; the CONNACK return code, None when no CONNACK came."""
    payload = _mqtt_string(f"haswarm-status-{time.monotonic_ns() % 10**9}")
    flags = 0x02  # clean session
    if user is not None:
        flags |= 0x80
        payload += _mqtt_string(user)
        if password is not None:
            flags |= 0x40
            payload += _mqtt_string(password)
    var = _mqtt_string("MQTT") + bytes([4, flags, 0, 10])
    body = var + payload
    s.sendall(bytes([0x10]) + _varint(len(body)) + body)
    data = b""
    while len(data) < 4:
        chunk = s.recv(4 - len(data))
        if not chunk:
            return None
        data += chunk
    return data[3] if data[0] == 0x20 else None


def _mqtt_string(s: str) -> bytes:
    b = s.encode()
    return len(b).to_bytes(2, "big") + b


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)
