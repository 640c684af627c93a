"""A broker's first answer, without a client library: one MQTT 3.1.1 CONNECT, its CONNACK."""

from __future__ import annotations

import socket
import time


def mqtt_connack(host: str, port: int, timeout: float = 1.5, user: str | None = None,
                 password: str | None = None) -> int | None:
    """Send an MQTT 3.1.1 CONNECT (anonymous unless `user`) and return the CONNACK return code
    (0 accepted, 5 not authorized...: either way a broker answered); None when none did."""
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
    packet = bytes([0x10]) + _varint(len(body)) + body
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(packet)
            data = b""
            while len(data) < 4:
                chunk = s.recv(4 - len(data))
                if not chunk:
                    return None
                data += chunk
            with_disconnect = bytes([0xE0, 0])
            if data[0] == 0x20 and data[3] == 0:
                s.sendall(with_disconnect)
            return data[3] if data[0] == 0x20 else None
    except OSError:
        return None


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
