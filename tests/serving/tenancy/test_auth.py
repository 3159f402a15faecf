"""API keys -> tenants: constant-time lookup, one error type that never echoes a key, open mode, key rotation."""

from __future__ import annotations

import hashlib
import os
import re

import pytest

from cluster.auth_config import AuthConfig
from serving.tenancy import auth as module
from serving.tenancy.auth import OPEN_TENANT, Authenticator, Unauthenticated, new_api_key


def _auth(tenants: dict[str, list[str]], **fields) -> AuthConfig:
    return AuthConfig.model_validate({
        "tenants": [{"name": name, "key_sha256": [hashlib.sha256(k.encode()).hexdigest() for k in keys]}
                    for name, keys in tenants.items()],
        **fields,
    })


def test_new_keys_have_the_prefix_enough_randomness_and_their_hash():
    key, digest = new_api_key()
    assert re.fullmatch(r"rs_[A-Za-z0-9_-]{43}", key)
    assert digest == hashlib.sha256(key.encode()).hexdigest()
    assert len({new_api_key()[0] for _ in range(50)}) == 50


def test_http_and_grpc_callers_get_their_tenant():
    key_a, key_b = new_api_key()[0], new_api_key()[0]
    auth = Authenticator(_auth({"team-a": [key_a], "team-b": [key_b]}))
    assert not auth.open and set(auth.tenants) == {"team-a", "team-b"}
    assert auth.authenticate(f"Bearer {key_a}").name == "team-a"
    assert auth.authenticate(f"bearer   {key_b} ").name == "team-b"
    assert auth.authenticate_grpc([("user-agent", "grpc"), ("authorization", f"Bearer {key_b}")]).name == "team-b"
    assert auth.authenticate_grpc([("Authorization", f"Bearer {key_a}".encode())]).name == "team-a"


@pytest.mark.parametrize("header, message", [
    (None, "Authorization header: no API key; send `Authorization: Bearer <key>`"),
    ("", "Authorization header: no API key"),
    ("Basic dXNlcjpwYXNz", "Authorization header: not of the form `Authorization: Bearer <key>`"),
    ("Bearer", "Authorization header: not of the form"),
    ("Bearer two words", "Authorization header: not of the form"),
    ("Bearer rs_revokedOrUnknownKey123", "Authorization header: the API key is not valid"),
    ("Bearer " + "x" * 10_000, "Authorization header: the API key is not valid"),
    ("Bearer clé-non-ascii", "Authorization header: the API key is not valid"),
])
def test_missing_malformed_and_unknown_keys_are_one_error_that_never_echoes_the_key(header, message):
    auth = Authenticator(_auth({"team-a": ["rs_the-real-key"]}))
    with pytest.raises(Unauthenticated) as caught:
        auth.authenticate(header)
    text = str(caught.value)
    assert text.startswith(message) and "\n" not in text
    for secret in ("rs_revokedOrUnknownKey123", "dXNlcjpwYXNz", "two words", "xxxx", "clé"):
        assert secret not in text


def test_grpc_without_the_metadata_names_the_metadata():
    auth = Authenticator(_auth({"team-a": ["k"]}))
    with pytest.raises(Unauthenticated, match="authorization metadata: no API key; send `authorization: Bearer <key>`"):
        auth.authenticate_grpc([("x-other", "1")])
    with pytest.raises(Unauthenticated, match="authorization metadata: the API key is not valid"):
        auth.authenticate_grpc([("authorization", "Bearer nope")])


def test_open_mode_is_the_default_tenant_whatever_is_sent():
    auth = Authenticator(None)
    assert auth.open and auth.tenants == {"default": OPEN_TENANT}
    assert auth.authenticate(None) is OPEN_TENANT and auth.authenticate_grpc([]) is OPEN_TENANT
    assert auth.authenticate("Bearer anything") is OPEN_TENANT


def test_every_configured_hash_is_compared_even_after_a_match(monkeypatch):
    compare = module.hmac.compare_digest

    keys = {f"team-{i}": [f"key-{i}"] for i in range(5)}
    auth = Authenticator(_auth(keys))
    calls = []
    monkeypatch.setattr(module.hmac, "compare_digest", lambda a, b: calls.append(1) or compare(a, b))
    assert auth.authenticate("Bearer key-0").name == "team-0"
    assert len(calls) == 5  # the first hash matched, the other four were still compared


def test_a_rotation_keeps_both_keys_valid_and_the_key_file_reloads_without_restart(tmp_path):
    old, new = "rs_old-key", "rs_new-key"
    key_file = tmp_path / "tenants.yaml"

    def write(*keys):
        hashes = ", ".join(hashlib.sha256(k.encode()).hexdigest() for k in keys)
        key_file.write_text(f"tenants:\n  - name: team-a\n    key_sha256: [{hashes}]\n")
        stamp = os.stat(key_file).st_mtime + len(keys)  # a new mtime even within the same clock tick
        os.utime(key_file, (stamp, stamp))

    clock = [0.0]
    write(old)
    auth = Authenticator(AuthConfig(key_file=str(key_file), key_file_reload_s=30), clock=lambda: clock[0])
    assert auth.authenticate(f"Bearer {old}").name == "team-a"

    write(old, new)  # step 1: the new hash beside the old
    with pytest.raises(Unauthenticated):
        auth.authenticate(f"Bearer {new}")  # not checked again before key_file_reload_s
    clock[0] = 31
    assert auth.authenticate(f"Bearer {new}").name == "team-a"
    assert auth.authenticate(f"Bearer {old}").name == "team-a"

    write(new)  # step 3: the old one removed
    clock[0] = 62
    with pytest.raises(Unauthenticated, match="the API key is not valid"):
        auth.authenticate(f"Bearer {old}")

    key_file.write_text("tenants: [\n")  # a broken update keeps the keys we had
    clock[0] = 93
    assert auth.authenticate(f"Bearer {new}").name == "team-a"
