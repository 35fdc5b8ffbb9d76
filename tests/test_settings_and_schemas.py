"""Settings fail fast with the variable's name; committed event schemas stay current."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest

from shared.events import JobSubmit, decode, json_schemas
from shared.settings import SettingsError, load_settings

SCHEMAS = Path(__file__).parent.parent / "shared" / "schemas"


def test_settings_come_from_jetcut_variables() -> None:
    s = load_settings({"JETCUT_ACK_WAIT_S": "12.5", "JETCUT_S3_SECURE": "true",
                       "JETCUT_NATS_URL": "nats://a:4222, nats://b:4222"})
    assert s.ack_wait_s == 12.5 and s.s3_secure is True
    assert s.nats_servers == ["nats://a:4222", "nats://b:4222"]


@pytest.mark.parametrize(("env", "needle"), [
    ({"JETCUT_ACK_WAIT_S": "-1"}, "JETCUT_ACK_WAIT_S"),
    ({"JETCUT_HTTP_PORT": "http"}, "JETCUT_HTTP_PORT"),
    ({"JETCUT_STORE": "ftp"}, "JETCUT_STORE"),
    ({"JETCUT_NAMESPACE": "Has.Dots"}, "JETCUT_NAMESPACE"),
    ({"JETCUT_TYPO_SETTING": "1"}, "JETCUT_TYPO_SETTING"),
])
def test_bad_settings_name_the_variable(env: dict[str, str], needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load_settings(env)


def test_committed_schemas_match_the_structs() -> None:
    generated = json_schemas()
    committed = {p.name.removesuffix(".schema.json"): json.loads(p.read_text())
                 for p in SCHEMAS.glob("*.schema.json")}
    assert committed == generated, "run `jetcut schema` and commit shared/schemas"


def test_bus_decoding_is_strict_about_types_but_tolerates_new_fields() -> None:
    assert decode(JobSubmit, b'{"recipe": "web", "added_in_v2": 1}').recipe == "web"
    with pytest.raises(msgspec.ValidationError, match="inputs"):
        decode(JobSubmit, b'{"recipe": "web", "inputs": "not a list"}')
