"""The ``auth:`` and ``callbacks:`` config sections: what they accept, and refusals that name the field."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import BaseModel, ConfigDict, ValidationError

from cluster.auth_config import (
    AuthConfig,
    CallbacksConfig,
    KeyFileError,
    TenantConfig,
    load_tenants,
    redis_password,
)


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _tenant(name: str, *keys: str, **fields) -> dict:
    return {"name": name, "key_sha256": [_hash(k) for k in keys] if len(keys) != 1 else _hash(keys[0]), **fields}


def test_every_field_is_described():
    for model in (TenantConfig, AuthConfig, CallbacksConfig):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no description"


def test_the_issue_example_validates_with_seedance_defaults():
    auth = AuthConfig.model_validate({"tenants": [_tenant("team-a", "k1", share=1, max_concurrent_jobs=4,
                                                          jobs_per_minute=60, max_priority="normal")]})
    (team,) = auth.tenants
    assert team.key_sha256 == [_hash("k1")] and team.max_queued_jobs == 120 and team.max_concurrent_jobs == 4
    assert TenantConfig.model_validate(_tenant("b", "k")).model_dump(exclude={"name", "key_sha256"}) == {
        "share": 1.0, "max_concurrent_jobs": None, "max_queued_jobs": 120, "jobs_per_minute": None,
        "max_priority": "normal",
    }


def test_a_key_can_have_two_hashes_during_a_rotation_and_hex_is_normalised():
    tenant = TenantConfig.model_validate({"name": "team-a", "key_sha256": [_hash("old").upper(), _hash("new")]})
    assert tenant.key_sha256 == [_hash("old"), _hash("new")]


@pytest.mark.parametrize("tenants, message", [
    ([_tenant("team-a", "k1"), _tenant("team-a", "k2")], "the name 'team-a' is used twice"),
    ([_tenant("team-a", "k1"), _tenant("team-b", "k1")], "'team-b' and 'team-a' share a key hash"),
    ([_tenant("Team_A", "k1")], "must be lowercase letters, digits and '-'"),
    ([{"name": "a", "key_sha256": "abc"}], "an entry of 3 characters is not a hex SHA-256"),
    ([{"name": "a", "key_sha256": []}], "lists no hash"),
    ([{"name": "a", "key_sha256": [_hash("k"), _hash("k")]}], "lists the same hash twice"),
    ([_tenant("a", "k", share=0)], "greater than 0"),
    ([_tenant("a", "k", max_priority="urgent")], "'low', 'normal' or 'high'"),
    ([_tenant("a", "k", quota=3)], "Extra inputs are not permitted"),
    ([_tenant("a", "k", max_queued_jobs=0)], "max_queued_jobs 0 needs max_concurrent_jobs"),
])
def test_bad_tenants_are_refused_naming_what_is_wrong(tenants, message):
    with pytest.raises(ValidationError, match=message):
        AuthConfig.model_validate({"tenants": tenants})


def test_a_plain_key_pasted_as_a_hash_is_never_echoed():
    plain = "rs_S3cretS3cretS3cretS3cretS3cretS3cretS3c"
    with pytest.raises(ValidationError) as caught:
        AuthConfig.model_validate({"tenants": [{"name": "a", "key_sha256": plain}]})
    assert plain not in str(caught.value) and "never the key" in str(caught.value)


def test_a_config_containing_auth_must_hide_inputs_too():
    class Leaky(BaseModel):
        auth: AuthConfig | None = None

    class Quiet(BaseModel):  # what ReelserveConfig needs: pydantic follows the outermost model's setting
        model_config = ConfigDict(hide_input_in_errors=True)
        auth: AuthConfig | None = None

    plain = {"auth": {"tenants": [{"name": "a", "key_sha256": "rs_S3cretS3cret"}]}}
    with pytest.raises(ValidationError) as leaky:
        Leaky.model_validate(plain)
    with pytest.raises(ValidationError) as quiet:
        Quiet.model_validate(plain)
    assert "rs_S3cretS3cret" in str(leaky.value) and "rs_S3cretS3cret" not in str(quiet.value)


def test_auth_without_tenants_or_file_is_refused():
    with pytest.raises(ValidationError, match="lists no tenants and no key_file; remove `auth:` to run open"):
        AuthConfig.model_validate({})


def test_the_key_file_adds_tenants_and_is_checked_against_the_inline_ones(tmp_path):
    key_file = tmp_path / "tenants.yaml"
    key_file.write_text(f"tenants:\n  - name: team-b\n    key_sha256: {_hash('kb')}\n    share: 2\n")
    auth = AuthConfig.model_validate({"tenants": [_tenant("team-a", "ka")], "key_file": str(key_file)})
    assert [t.name for t in load_tenants(auth)] == ["team-a", "team-b"]

    as_json = tmp_path / "tenants.json"
    as_json.write_text(json.dumps({"tenants": [_tenant("team-a", "kb")]}))
    clash = AuthConfig.model_validate({"tenants": [_tenant("team-a", "ka")], "key_file": str(as_json)})
    with pytest.raises(KeyFileError, match="the name 'team-a' is used twice"):
        load_tenants(clash)


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("tenants: [\n", "not valid YAML"),
    ("tenants:\n  - name: a\n    key_sha256: rs_plainkeyplainkey\n", "tenants.0.key_sha256: Value error, an entry of 19"),
    ("teams: []\n", "tenants: Field required"),
])
def test_a_bad_key_file_is_refused_naming_the_file_and_never_a_key(tmp_path, content, message):
    key_file = tmp_path / "tenants.yaml"
    if content is not None:
        key_file.write_text(content)
    auth = AuthConfig.model_validate({"key_file": str(key_file)})
    with pytest.raises(KeyFileError, match=message) as caught:
        load_tenants(auth)
    assert str(key_file) in str(caught.value) and "rs_plainkey" not in str(caught.value)


def test_callbacks_default_to_refused_and_check_their_prefixes():
    assert CallbacksConfig().allowed_url_prefixes == []
    ok = CallbacksConfig(allowed_url_prefixes=["https://hooks.example.com/reelserve/", "http://10.0.0.5:8080/"])
    assert len(ok.allowed_url_prefixes) == 2
    for bad, message in [("ftp://x/", "not an http"), ("https://u:p@x/", "may not hold a user"),
                         ("https://x/?a=1", "may not hold a user, a query"), ("hooks.example.com", "not an http")]:
        with pytest.raises(ValidationError, match=message):
            CallbacksConfig(allowed_url_prefixes=[bad])
    with pytest.raises(ValidationError, match="backoff_cap_s must be at least backoff_base_s"):
        CallbacksConfig(backoff_base_s=10, backoff_cap_s=1)


def test_the_redis_password_comes_from_its_environment_variable():
    assert redis_password({"REELSERVE_REDIS_PASSWORD": "p4ss"}) == "p4ss"
    assert redis_password({"REELSERVE_REDIS_PASSWORD": ""}) is None and redis_password({}) is None
