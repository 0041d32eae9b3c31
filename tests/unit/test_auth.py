"""server.auth: the one access policy both edges use (tokens, loopback, bearer parsing, gRPC peers)."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from server.auth import AccessPolicy, Scope, bearer_token, grpc_peer_host, is_loopback
from server.errors import PermissionDenied, Unauthenticated
from server.settings import Settings

LOCAL, REMOTE = "127.0.0.1", "203.0.113.9"
ADMIN, INFER = "admin-secret", "infer-secret"


@pytest.mark.parametrize(
    ("authorization", "peer", "outcome"),
    [
        (None, LOCAL, None),
        (None, "::1", None),
        (None, "::ffff:127.0.0.1", None),
        (None, REMOTE, PermissionDenied),
        (f"Bearer {ADMIN}", REMOTE, PermissionDenied),  # no token configured: nothing opens remote access
        (None, None, PermissionDenied),
        (None, "testclient", PermissionDenied),
    ],
)
def test_admin_without_token_is_loopback_only(
    authorization: str | None, peer: str | None, outcome: type | None
) -> None:
    _expect(AccessPolicy(), Scope.ADMIN, authorization, peer, outcome)


@pytest.mark.parametrize("peer", [LOCAL, REMOTE])
@pytest.mark.parametrize(
    ("authorization", "outcome"),
    [
        (None, Unauthenticated),
        ("", Unauthenticated),
        (f"Basic {ADMIN}", Unauthenticated),
        ("Bearer", Unauthenticated),
        ("Bearer wrong", PermissionDenied),
        (f"Bearer {INFER}", PermissionDenied),
        (f"Bearer {ADMIN}x", PermissionDenied),
        (f"Bearer {ADMIN}", None),
        (f"bearer  {ADMIN} ", None),
    ],
)
def test_admin_with_token_applies_to_everyone(authorization: str | None, outcome: type | None, peer: str) -> None:
    _expect(AccessPolicy(ADMIN, INFER), Scope.ADMIN, authorization, peer, outcome)


@pytest.mark.parametrize(
    ("authorization", "outcome"),
    [(None, Unauthenticated), ("Bearer wrong", PermissionDenied), (f"Bearer {INFER}", None), (f"Bearer {ADMIN}", None)],
)
def test_inference_token(authorization: str | None, outcome: type | None) -> None:
    _expect(AccessPolicy(ADMIN, INFER), Scope.INFERENCE, authorization, REMOTE, outcome)


def test_inference_is_open_without_its_token() -> None:
    policy = AccessPolicy(admin_token=ADMIN)
    assert not policy.guards(Scope.INFERENCE) and policy.guards(Scope.ADMIN)
    _expect(policy, Scope.INFERENCE, None, REMOTE, None)
    _expect(policy, Scope.INFERENCE, "Bearer wrong", REMOTE, None)


def test_policy_from_settings_treats_empty_tokens_as_unset() -> None:
    policy = AccessPolicy.from_settings(Settings(admin_token=SecretStr(""), inference_token=SecretStr("i")))
    assert policy == AccessPolicy(None, "i")
    assert "s3cr3t-value" not in repr(Settings(inference_token=SecretStr("s3cr3t-value")))


def test_error_messages_do_not_echo_the_token() -> None:
    with pytest.raises(PermissionDenied) as denied:
        AccessPolicy(ADMIN).check(Scope.ADMIN, "Bearer guess-123", LOCAL)
    assert "guess-123" not in denied.value.message and ADMIN not in denied.value.message


def test_bearer_token() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("BEARER abc") == "abc"
    assert bearer_token("Token abc") is None
    assert bearer_token(None) is None


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.1", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("192.0.2.2", False),
        ("::ffff:10.0.0.1", False),
        ("0.0.0.0", False),
        ("localhost", False),
        ("", False),
        (None, False),
    ],
)
def test_is_loopback(host: str | None, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("peer", "host"),
    [
        ("ipv4:127.0.0.1:5000", "127.0.0.1"),
        ("ipv6:[::1]:5000", "::1"),
        ("ipv6:%5B::1%5D:52286", "::1"),
        ("ipv4:192.0.2.2:58916", "192.0.2.2"),
        ("unix:/tmp/sock", None),
        ("", None),
    ],
)
def test_grpc_peer_host(peer: str, host: str | None) -> None:
    assert grpc_peer_host(peer) == host


def _expect(
    policy: AccessPolicy, scope: Scope, authorization: str | None, peer: str | None, outcome: type | None
) -> None:
    if outcome is None:
        policy.check(scope, authorization, peer)
    else:
        with pytest.raises(outcome):
            policy.check(scope, authorization, peer)
