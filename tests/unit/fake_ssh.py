"""What the unit tests' in-process SSH servers share: no authentication, every channel opened."""

from __future__ import annotations

import paramiko


class OpenServer(paramiko.ServerInterface):
    """An SSH server interface that lets anyone in and opens every channel; a subclass decides
    what an exec request does (`check_channel_exec_request`)."""

    def get_allowed_auths(self, username: str) -> str:
        return "none"

    def check_auth_none(self, username: str) -> int:
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind: str, chanid: int) -> int:
        return paramiko.OPEN_SUCCEEDED
