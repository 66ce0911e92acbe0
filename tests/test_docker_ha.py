"""docker/compose.ha.yaml: the high-availability overlay (a PostgreSQL decision log and
a standby coordinator), checked statically like docker/compose.yaml (tests/test_docker.py):
valid against the Compose Specification; merged over compose.yaml as `docker compose
-f compose.yaml -f compose.ha.yaml` does, both coordinators' command lines accepted by
the real parser; the log's DSN comes from a secret, reaches the log database and
carries no password on the command line; each coordinator advertises its own service
address; standbys count as healthy; the demo knows both addresses."""

from __future__ import annotations

import copy
import subprocess
import sys
from typing import Any
from urllib.parse import urlparse

import pytest

from tests.test_docker import (
    COMPOSE_FILE,
    DOCKER,
    POSTGRES_PORT,
    _assert_flags_known,
    _capture_parser,
    _command,
    _flag,
    _load_yaml,
    _one,
    _options,
    _parse,
    _running,
    _split,
)

HA_FILE = DOCKER / "compose.ha.yaml"
REPLACED = {"command", "test", "entrypoint"}
"""Keys whose value an override file replaces; other lists are merged."""


def _merge(base: Any, override: Any, key: str = "") -> Any:
    """Compose's merge of an override file (enough of it for these files)."""
    if isinstance(base, dict) and isinstance(override, dict):
        out = dict(base)
        for k, v in override.items():
            out[k] = _merge(base[k], v, k) if k in base else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(override, list) and key not in REPLACED:
        return base + [v for v in override if v not in base]
    return copy.deepcopy(override)


@pytest.fixture(scope="module")
def merged() -> dict[str, Any]:
    result = _merge(_load_yaml(COMPOSE_FILE), _load_yaml(HA_FILE))
    assert isinstance(result, dict)
    return result


def test_the_overlay_is_valid_against_the_compose_specification() -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(HA_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_two_coordinators_of_one_id_share_the_postgresql_log(merged: dict[str, Any]) -> None:
    from coordinator.__main__ import parse_args

    services = merged["services"]
    coordinators = _running(services, "twopc-coordinator")
    assert set(coordinators) == {"coordinator", "coordinator-standby"}
    parser = _capture_parser(parse_args)
    assert parser is not None
    ids, dsns = set(), set()
    for name, service in coordinators.items():
        argv = _command(service)[1:]
        _assert_flags_known(argv, _options(parser), name)
        config, _level = _parse(parse_args, argv, name)
        ids.add(config.id)
        assert "--log" not in argv, f"{name}: the log's DSN (and password) in argv"
        secret = config.log_dsn_file
        assert secret is not None and str(secret.parent) == "/run/secrets", name
        assert secret.name in service["secrets"], name
        dsns.add((DOCKER / merged["secrets"][secret.name]["file"]).read_text().strip())
        # Clients are sent to the advertised address: the service's own name.
        host, port = _split(config.advertise or "")
        assert host == name and port == _split(config.listen)[1], name
        assert services[name]["depends_on"]["log-db"]["condition"] == "service_healthy"
        test = " ".join(services[name]["healthcheck"]["test"])
        assert "--answering" in test, f"{name}: a standby is NOT_SERVING, yet healthy"
        assert f"127.0.0.1:{_split(config.listen)[1]}" in test
    assert len(ids) == 1, "one coordinator id"
    (dsn,) = dsns
    url = urlparse(dsn)
    assert url.scheme == "postgresql"
    assert (url.hostname, url.port) == ("log-db", POSTGRES_PORT)
    db = services["log-db"]
    assert db["image"].startswith("postgres:")
    assert url.path.lstrip("/") == db["environment"]["POSTGRES_DB"]
    assert url.username != db["environment"]["POSTGRES_USER"], "not as the superuser"
    role_script = (DOCKER / "initdb-log" / "10-coordinator-role.sh").read_text()
    assert f"CREATE ROLE {url.username} LOGIN NOSUPERUSER" in role_script
    assert "log-db-password" in db["secrets"]  # what docker/initdb-log/ gives the role
    assert "log-db-password" in role_script
    password = (DOCKER / merged["secrets"]["log-db-password"]["file"]).read_text().strip()
    assert url.password == password
    assert "POSTGRES_PASSWORD" not in db["environment"], "passwords come from files"
    assert any(str(v).endswith(":/var/lib/postgresql/data") for v in db["volumes"])
    assert "healthcheck" in db


def test_every_certificate_names_the_standby_host(merged: dict[str, Any]) -> None:
    argv = _command(merged["services"]["certs"])
    assert {"coordinator", "coordinator-standby"} <= set(_flag(argv, "--host"))


def test_the_demo_knows_both_coordinators(merged: dict[str, Any]) -> None:
    from bank_demo.__main__ import _parser

    services = merged["services"]
    (demo,) = _running(services, "bank-demo").values()
    argv = _command(demo)[1:]
    _parse(_parser().parse_args, argv, "bank-demo")
    addresses = [_split(a) for a in _one(argv, "--coordinator").split(",")]
    assert {h for h, _ in addresses} == {"coordinator", "coordinator-standby"}
    for host, port in addresses:
        assert port == _split(_one(_command(services[host])[1:], "--listen"))[1]
        assert demo["depends_on"][host]["condition"] == "service_healthy"


def test_every_agent_asks_both_coordinator_processes(merged: dict[str, Any]) -> None:
    """An agent's in-doubt questions reach whichever process is active."""
    from participant.__main__ import parse_args

    services = merged["services"]
    agents = _running(services, "twopc-participant")
    assert len(agents) == 3
    for name, service in agents.items():
        config, _level = _parse(parse_args, _command(service)[1:], name)
        addresses = config.coordinators["coord1"]
        assert {_split(a)[0] for a in addresses} == {"coordinator", "coordinator-standby"}, name
        for host, port in map(_split, addresses):
            assert port == _split(_one(_command(services[host])[1:], "--listen"))[1], name
