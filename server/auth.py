"""Who may call what: one access policy that both the HTTP and the gRPC edge ask.

Two scopes. ``ADMIN`` (upload, load, unload) is allowed from loopback clients while no admin token is set;
once ``OPTISERVE_ADMIN_TOKEN`` is set, every client must send ``Authorization: Bearer <token>``.
``INFERENCE`` (inference, metadata, statistics, index) is open unless ``OPTISERVE_INFERENCE_TOKEN`` is set;
then that token or the admin token is required. Health checks are never guarded (probes carry no token).
"""

from __future__ import annotations

import hmac
import ipaddress
import urllib.parse
from dataclasses import dataclass
from enum import Enum

from pydantic import SecretStr

from server.errors import PermissionDenied, Unauthenticated
from server.settings import Settings


class Scope(str, Enum):
    """What a request wants to do."""

    ADMIN = "admin"
    INFERENCE = "inference"


@dataclass(frozen=True)
class AccessPolicy:
    """The configured tokens; an empty token counts as unset."""

    admin_token: str | None = None
    inference_token: str | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> AccessPolicy:
        """Read the tokens from the settings."""
        return cls(_secret(settings.admin_token), _secret(settings.inference_token))

    def guards(self, scope: Scope) -> bool:
        """Whether requests of this scope are checked at all (lets the edges skip open routes)."""
        return scope is Scope.ADMIN or self.inference_token is not None

    def check(self, scope: Scope, authorization: str | None, peer_host: str | None) -> None:
        """Raise Unauthenticated (401) or PermissionDenied (403) unless the request may go on."""
        if scope is Scope.ADMIN:
            self._check_admin(authorization, peer_host)
        elif self.inference_token is not None:
            allowed = [t for t in (self.inference_token, self.admin_token) if t is not None]
            _require_token(allowed, authorization, "inference")

    def _check_admin(self, authorization: str | None, peer_host: str | None) -> None:
        if self.admin_token is not None:
            _require_token([self.admin_token], authorization, "model management")
        elif not is_loopback(peer_host):
            raise PermissionDenied(
                f"model management is only allowed from loopback clients (this one is {peer_host or 'unknown'}); "
                "set OPTISERVE_ADMIN_TOKEN to allow it from elsewhere with a bearer token"
            )


def _secret(value: SecretStr | None) -> str | None:
    return (value.get_secret_value() or None) if value is not None else None


def _require_token(allowed: list[str], authorization: str | None, what: str) -> None:
    """Compare the bearer token in constant time against every allowed token."""
    token = bearer_token(authorization)
    if token is None:
        raise Unauthenticated(f"{what} requires an 'Authorization: Bearer <token>' header")
    matches = [hmac.compare_digest(token.encode(), candidate.encode()) for candidate in allowed]
    if not any(matches):
        raise PermissionDenied(f"the bearer token given does not allow {what}")


def bearer_token(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` value; None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8, ::1 and IPv4-mapped loopback; anything unparsable is not loopback."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def grpc_peer_host(peer: str | None) -> str | None:
    """The address in a grpc peer string (``ipv4:127.0.0.1:5000``, ``ipv6:[::1]:5000``), else None."""
    if not peer:
        return None
    kind, _, rest = urllib.parse.unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or None
    if kind == "ipv6":
        host = rest.rpartition(":")[0]
        return host.strip("[]") or None
    return None
