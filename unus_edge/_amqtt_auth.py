"""amqtt authentication plugin for the embedded broker (imported only when amqtt is installed).

amqtt 0.12 marks every client admitted by its ``AnonymousAuthPlugin`` as anonymous and then
throws its session away at disconnect, so ``clean_session=False`` silently stops working: no
queued QoS 1 messages, no kept subscriptions. This plugin admits clients *without* marking them
anonymous, so persistent sessions work for everyone; given a ``users`` table it instead requires
a matching username and password: the table's value is either a Mosquitto ``$7$`` hash (from a
password file, see :mod:`unus_edge._passwords`) or the password itself, compared in constant time.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass, field

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session

from unus_edge._passwords import verify_password

__all__ = ["SessionKeepingAuthPlugin"]


class SessionKeepingAuthPlugin(BaseAuthPlugin):  # type: ignore[misc]
    """Admit clients (or check them against ``users``) without dropping their sessions."""

    @dataclass
    class Config:
        users: dict[str, str] = field(default_factory=dict)

    async def authenticate(self, *, session: Session) -> bool:
        users: dict[str, str] = getattr(self.context.config, "users", {}) or {}
        if not users:
            return True
        username = session.username or ""
        expected = users.get(username)
        if expected is None or session.password is None:
            return False
        if expected.startswith("$7$"):
            return verify_password(expected, str(session.password))
        return hmac.compare_digest(expected.encode(), str(session.password).encode())
