"""docker/: the Compose deployment, checked without a Docker engine.

No engine runs on the development and CI machines, so this module checks statically
what `docker compose up` would trip over:

- docker/compose.yaml is valid against the Compose Specification JSON schema, checked by
  the `check-jsonschema` tool with the copy of the schema it vendors
  (`--builtin-schema vendor.compose-spec`, offline);
- every command a service runs is a console script of pyproject.toml, and the real
  argument parsers (`coordinator.__main__.parse_args`, `participant.__main__.parse_args`,
  bank-demo's own parser once it has the deployment mode) accept its flags, spelled out
  in full;
- the wiring: coordinator -> Toxiproxy -> agent and agent -> Toxiproxy -> PostgreSQL,
  agent -> coordinator, bank-demo -> coordinator, databases and Toxiproxy API; health
  checks probe the ports the daemons listen on; published ports are listen ports;
- docker/Dockerfile copies only files that exist in the repository and that its
  ignore file lets into the build context.

Where a `docker` CLI with the compose plugin exists, `docker compose config` checks the
file too (it needs no engine); elsewhere that test is skipped.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import pytest
from psycopg.conninfo import conninfo_to_dict
from ruamel.yaml import YAML

from twopc_common.statements import AGENT_SCHEMA

ROOT = Path(__file__).resolve().parent.parent
DOCKER = ROOT / "docker"
COMPOSE_FILE = DOCKER / "compose.yaml"
TOXIPROXY_CONFIG = DOCKER / "toxiproxy.json"
SHARDS = ["shard1", "shard2", "shard3"]
AGENT_ROLE_SCRIPT = DOCKER / "initdb" / "10-agent-role.sh"

POSTGRES_PORT = 5432
DAEMON_RESTART = {"unless-stopped", "always", "on-failure"}
GRAFANA_PORT = 3000
PROMETHEUS_CONFIG = DOCKER / "prometheus.yml"
GRAFANA = DOCKER / "grafana"

Service = dict[str, Any]


# ---------------------------------------------------------------------------- loading


def _load_yaml(path: Path) -> Any:
    # The same YAML 1.2 loader check-jsonschema uses; resolves anchors and `<<` merges.
    return YAML(typ="safe", pure=True).load(path.read_text())


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data = _load_yaml(COMPOSE_FILE)
    assert isinstance(data, dict)
    return data


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Service]:
    return dict(compose["services"])


@pytest.fixture(scope="module")
def proxies() -> list[dict[str, Any]]:
    return list(json.loads(TOXIPROXY_CONFIG.read_text()))


@pytest.fixture(scope="module")
def scripts() -> dict[str, str]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def _command(service: Service) -> list[str]:
    command = service.get("command", [])
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command]


def _running(services: dict[str, Service], script: str) -> dict[str, Service]:
    """The services running `script` as a daemon (not one of its subcommands)."""
    return {
        n: s
        for n, s in services.items()
        if _command(s)[:1] == [script] and _command(s)[1:2] not in (["certs"], ["inspect"])
    }


def _one_shot(service: Service) -> bool:
    """The demo and the certificate maker run once; everything else is a daemon."""
    return _command(service)[:1] == ["bank-demo"] or _command(service)[1:2] == ["certs"]


def _by_image(services: dict[str, Service], prefix: str) -> dict[str, Service]:
    return {n: s for n, s in services.items() if str(s.get("image", "")).startswith(prefix)}


def _split(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    assert sep and host and port.isdigit(), f"{address!r} is not HOST:PORT"
    return host, int(port)


def _named(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        assert sep, f"{item!r} is not NAME=VALUE"
        assert name not in out, f"{name} given twice"
        out[name] = value
    return out


def _flag(argv: list[str], flag: str) -> list[str]:
    """Every value given to `flag` in argv (as `--flag value` or `--flag=value`)."""
    values = []
    for i, arg in enumerate(argv):
        if arg == flag:
            values.append(argv[i + 1])
        elif arg.startswith(flag + "="):
            values.append(arg.split("=", 1)[1])
    return values


def _one(argv: list[str], flag: str) -> str:
    values = _flag(argv, flag)
    assert len(values) == 1, f"{flag} given {len(values)} times in {argv}"
    return values[0]


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _capture_parser(entry: Callable[[list[str]], object]) -> argparse.ArgumentParser | None:
    """The ArgumentParser `entry` builds: stop it at its first parse_args call."""

    def capture(self: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        raise _Captured(self)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", capture)
        try:
            entry(["--help"])
        except _Captured as captured:
            return captured.parser
        except SystemExit:
            return None
    return None


def _options(parser: argparse.ArgumentParser, subcommand: str | None = None) -> set[str]:
    if subcommand is not None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                parser = action.choices[subcommand]
                break
        else:
            raise AssertionError(f"no subcommand {subcommand}")
    return set(parser._option_string_actions)


def _assert_flags_known(argv: list[str], known: set[str], what: str) -> None:
    """Flags spelled out in full: argparse would also take unambiguous abbreviations."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    assert given <= known, f"{what}: unknown flags {sorted(given - known)}"


def _parse(parse: Callable[[list[str]], Any], argv: list[str], what: str) -> Any:
    try:
        return parse(argv)
    except SystemExit as exc:  # argparse's error(): its message is on stderr
        raise AssertionError(f"{what} rejects its command line {argv}: exit {exc.code}") from exc


# ------------------------------------------------------------------- the compose spec


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    # check-jsonschema's own CLI with the Compose Specification schema it vendors
    # (offline: no schema is downloaded).
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "check_jsonschema",
            "--builtin-schema",
            "vendor.compose-spec",
            str(COMPOSE_FILE),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_references_resolve(compose: dict[str, Any], services: dict[str, Service]) -> None:
    declared_volumes = set(compose.get("volumes") or {})
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        for target, how in (service.get("depends_on") or {}).items():
            assert target in services, f"{name} depends on unknown service {target}"
            if how.get("condition") == "service_healthy":
                assert "healthcheck" in services[target], f"{target} has no healthcheck"
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                assert (COMPOSE_FILE.parent / source).exists(), f"{name}: {source} is missing"
            else:
                assert source in declared_volumes, f"{name}: volume {source} not declared"


def test_docker_compose_config_accepts_the_file_when_docker_is_installed() -> None:
    docker = shutil.which("docker")
    if docker is None:
        pytest.skip("no docker CLI on this machine (the schema test covers the file)")
    probe = subprocess.run(
        [docker, "compose", "version"], capture_output=True, text=True, timeout=20
    )
    if probe.returncode != 0:
        pytest.skip("the docker CLI has no compose plugin")
    result = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


# ----------------------------------------------------------------- services and images


def test_postgres_shards(services: dict[str, Service]) -> None:
    dbs = _by_image(services, "postgres:")
    assert len(dbs) == len(SHARDS)
    for name, db in dbs.items():
        assert db["image"] == "postgres:15", name
        command = _command(db)
        assert command[:1] == ["postgres"], name
        settings = _named([command[i + 1] for i, a in enumerate(command) if a == "-c"])
        assert int(settings.get("max_prepared_transactions", "0")) > 0, name
        assert "port" not in settings, f"{name}: the wiring assumes port {POSTGRES_PORT}"
        test = db["healthcheck"]["test"]
        assert "pg_isready" in (test if isinstance(test, str) else " ".join(test)), name
        assert db["restart"] in DAEMON_RESTART, name
        assert any(str(v).endswith(":/var/lib/postgresql/data") for v in db["volumes"])


def test_commands_are_console_scripts(
    services: dict[str, Service], scripts: dict[str, str]
) -> None:
    theirs = {
        **_by_image(services, "postgres:"),
        **_by_image(services, "ghcr.io/shopify/"),
        **_by_image(services, "prom/prometheus:"),
        **_by_image(services, "grafana/grafana:"),
    }
    ours = {n: s for n, s in services.items() if n not in theirs}
    assert ours
    for name, service in ours.items():
        command = _command(service)
        assert command, f"{name} runs the image's default command"
        assert command[0] in scripts, f"{name} runs {command[0]}, not a console script"
    for script in ("twopc-coordinator", "twopc-participant", "bank-demo"):
        assert _running(services, script), f"no service runs {script}"


def test_one_image_built_once_from_the_dockerfile(services: dict[str, Service]) -> None:
    ours = {
        n: s
        for n, s in services.items()
        if _command(s)[:1] in (["twopc-coordinator"], ["twopc-participant"], ["bank-demo"])
    }
    builders = {n: s for n, s in ours.items() if "build" in s}
    assert len(builders) == 1, f"the image should be built by one service, not {list(builders)}"
    (builder,) = builders.values()
    assert {s["image"] for s in ours.values()} == {builder["image"]}
    for name, service in ours.items():
        if service is not builder:
            # Never pulled from a registry: compose builds it (for `builder`) first.
            assert service.get("pull_policy") == "never", name
    context = (COMPOSE_FILE.parent / builder["build"]["context"]).resolve()
    assert context == ROOT, "the build context is the repository root"
    dockerfile = context / builder["build"]["dockerfile"]
    assert dockerfile == DOCKER / "Dockerfile"
    assert dockerfile.is_file()


def test_restart_policies(services: dict[str, Service]) -> None:
    for name, service in services.items():
        if _one_shot(service):
            assert service.get("restart", "no") == "no", f"{name} runs once"
        else:
            assert service.get("restart") in DAEMON_RESTART, name


# ------------------------------------------------------------------ the real parsers


def test_coordinator_command_line_is_accepted(services: dict[str, Service]) -> None:
    from coordinator.__main__ import parse_args

    (coordinator,) = _running(services, "twopc-coordinator").values()
    argv = _command(coordinator)[1:]
    parser = _capture_parser(parse_args)
    assert parser is not None
    _assert_flags_known(argv, _options(parser), "twopc-coordinator")
    config, _level = _parse(parse_args, argv, "twopc-coordinator")
    assert set(config.participants) == set(SHARDS)
    assert _split(config.listen)[0] == "0.0.0.0", "reachable from the other containers"


def test_participant_command_lines_are_accepted(services: dict[str, Service]) -> None:
    from participant.__main__ import parse_args

    agents = _running(services, "twopc-participant")
    assert len(agents) == len(SHARDS)
    parser = _capture_parser(parse_args)
    assert parser is not None
    ids = []
    for name, agent in agents.items():
        argv = _command(agent)[1:]
        _assert_flags_known(argv, _options(parser), f"twopc-participant ({name})")
        config, _level = _parse(parse_args, argv, f"twopc-participant ({name})")
        assert _split(config.listen)[0] == "0.0.0.0", name
        ids.append(config.id)
    assert sorted(ids) == SHARDS


def _bank_demo_argv(services: dict[str, Service]) -> list[str]:
    (demo,) = _running(services, "bank-demo").values()
    return _command(demo)[1:]


def test_bank_demo_command_line_is_accepted_by_bank_demo(services: dict[str, Service]) -> None:
    from bank_demo.__main__ import _parser

    parser = _parser()
    argv = _bank_demo_argv(services)
    assert argv[:1] == ["run"]
    _assert_flags_known(argv, _options(parser, "run"), "bank-demo run")
    _parse(parser.parse_args, argv, "bank-demo")


# ------------------------------------------------------------------------- the wiring


class Deployment:
    """The addresses of docker/compose.yaml and docker/toxiproxy.json, resolved."""

    def __init__(
        self,
        services: dict[str, Service],
        proxies: list[dict[str, Any]],
        secrets: dict[str, dict[str, str]],
    ) -> None:
        self.services = services
        self.secrets = secrets
        self.dbs = _by_image(services, "postgres:")
        (self.toxiproxy_name, self.toxiproxy), *rest = _by_image(
            services, "ghcr.io/shopify/toxiproxy:"
        ).items()
        assert not rest, "one Toxiproxy"
        (self.coordinator_name, coordinator), *rest = _running(
            services, "twopc-coordinator"
        ).items()
        assert not rest, "one coordinator"
        self.coordinator = _command(coordinator)[1:]
        self.agents = {
            n: _command(s)[1:] for n, s in _running(services, "twopc-participant").items()
        }
        self.demo = _bank_demo_argv(services)
        self.proxies = {p["name"]: p for p in proxies}
        assert len(self.proxies) == len(proxies), "proxy names are unique"
        self.by_listen_port = {_split(p["listen"])[1]: p for p in proxies}
        assert len(self.by_listen_port) == len(proxies), "proxy listen ports are unique"

    def toxiproxy_flag(self, flag: str, default: str) -> str:
        for arg in _command(self.toxiproxy):
            if arg.startswith(f"-{flag}=") or arg.startswith(f"--{flag}="):
                return arg.split("=", 1)[1]
        return default

    def listen_ports(self, service: str) -> set[int]:
        if service in self.dbs:
            return {POSTGRES_PORT}
        if service == self.toxiproxy_name:
            api = int(self.toxiproxy_flag("port", "8474"))
            return {api} | set(self.by_listen_port)
        if service == self.coordinator_name:
            return {
                _split(a)[1]
                for a in _flag(self.coordinator, "--listen") + _flag(self.coordinator, "--metrics")
            }
        if service in self.agents:
            argv = self.agents[service]
            return {_split(a)[1] for a in _flag(argv, "--listen") + _flag(argv, "--metrics")}
        if service == "prometheus":
            (listen,) = _flag(_command(self.services[service]), "--web.listen-address")
            return {_split(listen)[1]}
        if service == "grafana":
            return {GRAFANA_PORT}
        return set()

    def through_proxy(self, address: str) -> tuple[str, str, int]:
        """address is a Toxiproxy listener: (proxy name, upstream service, upstream port)."""
        host, port = _split(address)
        assert host == self.toxiproxy_name, f"{address} does not go through Toxiproxy"
        assert port in self.by_listen_port, f"no Toxiproxy proxy listens on {port}"
        proxy = self.by_listen_port[port]
        upstream_host, upstream_port = _split(proxy["upstream"])
        return proxy["name"], upstream_host, upstream_port

    def agent_with_id(self, participant_id: str) -> str:
        (name,) = [n for n, argv in self.agents.items() if _one(argv, "--id") == participant_id]
        return name

    def secret_file(self, service: str, path: str) -> str:
        """The content of `path`, which must be a compose secret of `service`."""
        where = Path(path)
        assert where.parent == Path("/run/secrets"), f"{service}: {path} is not a secret"
        assert where.name in self.services[service].get("secrets", []), (service, path)
        return (DOCKER / self.secrets[where.name]["file"]).read_text().strip()

    def role_password(self, db: str, role: str) -> str:
        """The password docker/initdb/ gives `role` on `db`: from the secret file its
        CREATE ROLE reads (a psql variable set from /run/secrets/NAME)."""
        script = AGENT_ROLE_SCRIPT.read_text()
        found = re.search(rf"CREATE ROLE {role} LOGIN NOSUPERUSER .*PASSWORD :'(\w+)';", script)
        assert found, f"docker/initdb/ creates no login role {role} with a password"
        source = re.search(rf'-v {found[1]}="\$\(cat (/run/secrets/[\w-]+)\)"', script)
        assert source, f"the password of {role} comes from no secret file"
        return self.secret_file(db, source[1])

    def agent_dsn(self, agent: str) -> str:
        """The agent's DSN: from its --dsn-file, a compose secret (never in argv)."""
        argv = self.agents[agent]
        assert "--dsn" not in argv, f"{agent}: a DSN on the command line"
        return self.secret_file(agent, _one(argv, "--dsn-file"))

    def agent_db(self, agent: str) -> tuple[str, dict[str, str]]:
        """The database an agent's DSN reaches (through Toxiproxy), and the DSN."""
        dsn = conninfo_to_dict(self.agent_dsn(agent))
        _proxy, db, port = self.through_proxy(f"{dsn['host']}:{dsn['port']}")
        assert db in self.dbs, f"{agent}'s DSN reaches {db}, not a database"
        assert port == POSTGRES_PORT
        return db, {k: str(v) for k, v in dsn.items()}


@pytest.fixture(scope="module")
def deployment(
    compose: dict[str, Any], services: dict[str, Service], proxies: list[dict[str, Any]]
) -> Deployment:
    return Deployment(services, proxies, compose.get("secrets") or {})


def test_toxiproxy_loads_the_proxies_at_start(deployment: Deployment) -> None:
    config_path = deployment.toxiproxy_flag("config", "")
    assert config_path, "Toxiproxy is started with -config"
    mounts = {}
    for volume in deployment.toxiproxy["volumes"]:
        source, target, *_mode = volume.split(":")
        mounts[target] = (COMPOSE_FILE.parent / source).resolve()
    assert mounts.get(config_path) == TOXIPROXY_CONFIG
    assert deployment.toxiproxy_flag("host", "localhost") == "0.0.0.0"
    for proxy in deployment.proxies.values():
        assert _split(proxy["listen"])[0] == "0.0.0.0", proxy["name"]
        assert proxy.get("enabled", True) is True, proxy["name"]


def test_every_proxy_upstream_is_a_listening_service(deployment: Deployment) -> None:
    api_port = int(deployment.toxiproxy_flag("port", "8474"))
    assert api_port not in deployment.by_listen_port
    for proxy in deployment.proxies.values():
        host, port = _split(proxy["upstream"])
        assert host in deployment.services, f"{proxy['name']}: no service {host}"
        assert port in deployment.listen_ports(host), (
            f"{proxy['name']} forwards to {host}:{port}, which listens on "
            f"{sorted(deployment.listen_ports(host))}"
        )


def test_coordinator_reaches_every_agent_through_toxiproxy(deployment: Deployment) -> None:
    participants = _named(_flag(deployment.coordinator, "--participant"))
    assert sorted(participants) == SHARDS
    assert len(deployment.agents) == len(SHARDS)
    reached = set()
    for participant_id, address in participants.items():
        proxy, upstream, port = deployment.through_proxy(address)
        agent = deployment.agent_with_id(participant_id)
        assert upstream == agent, f"{participant_id} goes to {upstream}, its agent is {agent}"
        assert _split(_one(deployment.agents[agent], "--listen"))[1] == port, proxy
        assert proxy == f"{participant_id}_agent"
        reached.add(agent)
    assert reached == set(deployment.agents)


def test_agents_reach_their_own_database_through_toxiproxy(deployment: Deployment) -> None:
    seen = {}
    for agent, argv in deployment.agents.items():
        db, dsn = deployment.agent_db(agent)
        shard = _one(argv, "--id")
        proxy, _host, _port = deployment.through_proxy(f"{dsn['host']}:{dsn['port']}")
        assert proxy == f"{shard}_pg"
        env = deployment.dbs[db]["environment"]
        assert dsn["dbname"] == env["POSTGRES_DB"]
        # The least-privilege role docker/initdb/ creates, with the password it is given.
        assert dsn["user"] != env["POSTGRES_USER"], "agents do not log in as the superuser"
        assert dsn["password"] == deployment.role_password(db, dsn["user"])
        # It owns the agent's schema, and its --branch-role is a role of its own.
        script = AGENT_ROLE_SCRIPT.read_text()
        assert f"CREATE SCHEMA {AGENT_SCHEMA} AUTHORIZATION {dsn['user']};" in script
        branch_role = _one(argv, "--branch-role")
        assert f"CREATE ROLE {branch_role} NOLOGIN NOSUPERUSER" in script
        assert f"GRANT {branch_role} TO {dsn['user']};" in script
        assert db in deployment.services[agent].get("depends_on", {}), agent
        seen[agent] = db
    assert len(set(seen.values())) == len(seen), f"agents share a database: {seen}"


def test_no_password_in_any_command_line_or_environment(deployment: Deployment) -> None:
    """Every secret is a file: the process list and `docker inspect` show none."""
    for name, service in deployment.services.items():
        argv = " ".join(_command(service))
        assert not re.search(r"password\s*=|://[^/@\s]*:[^/@\s]*@", argv, re.I), name
        environment = service.get("environment") or {}
        for key in environment:
            assert "PASSWORD" not in key.upper() or key.upper().endswith("_FILE"), (name, key)
    for db, service in deployment.dbs.items():
        path = service["environment"]["POSTGRES_PASSWORD_FILE"]
        assert deployment.secret_file(db, path), f"{db}: an empty superuser password"


def test_agents_reach_the_coordinator(deployment: Deployment) -> None:
    coordinator_id = _one(deployment.coordinator, "--id")
    coordinator_port = _split(_one(deployment.coordinator, "--listen"))[1]
    for agent, argv in deployment.agents.items():
        coordinators = _named(_flag(argv, "--coordinator"))
        assert list(coordinators) == [coordinator_id], agent
        host, port = _split(coordinators[coordinator_id])
        assert (host, port) == (deployment.coordinator_name, coordinator_port), agent


def test_bank_demo_reaches_the_deployment(deployment: Deployment) -> None:
    argv = deployment.demo
    host, port = _split(_one(argv, "--coordinator"))
    assert host == deployment.coordinator_name
    assert port in deployment.listen_ports(host)
    assert not _flag(argv, "--shard"), "the demo's DSNs (passwords) come from files"
    shards = _named(_flag(argv, "--shard-dsn-file"))
    assert sorted(shards) == SHARDS
    for shard, path in shards.items():
        # The checker reads each shard directly, not through the faults.
        dsn = conninfo_to_dict(deployment.secret_file("bank-demo", path))
        agent_db, agent_dsn = deployment.agent_db(deployment.agent_with_id(shard))
        assert dsn["host"] == agent_db, f"{shard}: the demo and the agent see different dbs"
        assert str(dsn.get("port", POSTGRES_PORT)) == str(POSTGRES_PORT)
        assert dsn["dbname"] == agent_dsn["dbname"], shard
        # Its own role (it creates and checks the tables), neither superuser nor agent.
        env = deployment.dbs[agent_db]["environment"]
        assert dsn["user"] not in (env["POSTGRES_USER"], agent_dsn["user"]), shard
        assert dsn["password"] == deployment.role_password(agent_db, str(dsn["user"]))
    url = urlparse(_one(argv, "--toxiproxy-url"))
    assert url.scheme == "http"
    assert url.hostname == deployment.toxiproxy_name
    assert url.port == int(deployment.toxiproxy_flag("port", "8474"))
    out = _one(argv, "--out")
    (demo,) = _running(deployment.services, "bank-demo").values()
    assert any(v.split(":")[1] == out for v in demo.get("volumes", [])), "--out is a volume"
    waits_for = demo.get("depends_on", {})
    for name in deployment.services:
        if name != "bank-demo" and "healthcheck" in deployment.services[name]:
            assert waits_for.get(name, {}).get("condition") == "service_healthy", name


def test_coordinator_decision_log_is_on_a_named_volume(
    compose: dict[str, Any], deployment: Deployment
) -> None:
    log = Path(_one(deployment.coordinator, "--log"))
    service = deployment.services[deployment.coordinator_name]
    named = {}
    for volume in service["volumes"]:
        source, target = volume.split(":")[:2]
        named[Path(target)] = source
    assert log.parent in named, f"{log} is not on a volume"
    assert named[log.parent] in compose["volumes"], "a named volume, kept across restarts"


def _published(service: Service) -> Iterator[tuple[int, int]]:
    for port in service.get("ports", []):
        parts = str(port).split(":")
        assert len(parts) in (2, 3), f"{port}: give HOST_PORT:CONTAINER_PORT"
        yield int(parts[-2]), int(parts[-1])


def test_published_ports_are_listen_ports(deployment: Deployment) -> None:
    coordinator = deployment.services[deployment.coordinator_name]
    coordinator_port = _split(_one(deployment.coordinator, "--listen"))[1]
    assert (coordinator_port, coordinator_port) in set(_published(coordinator))
    api_port = int(deployment.toxiproxy_flag("port", "8474"))
    assert api_port == 8474
    assert (api_port, api_port) in set(_published(deployment.toxiproxy))
    for name, service in deployment.services.items():
        for _host_port, container_port in _published(service):
            assert container_port in deployment.listen_ports(name), (name, container_port)


def test_daemon_healthchecks_probe_the_listen_port(deployment: Deployment) -> None:
    daemons = {deployment.coordinator_name: deployment.coordinator, **deployment.agents}
    for name, argv in daemons.items():
        test = deployment.services[name]["healthcheck"]["test"]
        text = test if isinstance(test, str) else " ".join(test)
        # `python -m twopc_common.health 127.0.0.1:PORT`: SERVING, not merely listening.
        assert "twopc_common.health" in text, name
        probed = {int(p) for p in re.findall(r"127\.0\.0\.1:(\d+)", text)}
        assert probed == {_split(_one(argv, "--listen"))[1]}, name


# ---------------------------------------------------------------- Prometheus, Grafana


def test_prometheus_scrapes_every_daemons_metrics_endpoint(deployment: Deployment) -> None:
    prometheus = deployment.services["prometheus"]
    mounts = {}
    for volume in prometheus["volumes"]:
        source, target, *_mode = volume.split(":")
        mounts[target] = (COMPOSE_FILE.parent / source).resolve()
    (config_flag,) = _flag(_command(prometheus), "--config.file")
    assert mounts[config_flag] == PROMETHEUS_CONFIG
    config = _load_yaml(PROMETHEUS_CONFIG)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    targets = {
        target
        for job in jobs.values()
        for static in job["static_configs"]
        for target in static["targets"]
    }
    daemons = {deployment.coordinator_name: deployment.coordinator, **deployment.agents}
    expected = set()
    for name, argv in daemons.items():
        host, port = _split(_one(argv, "--metrics"))
        assert host == "0.0.0.0", f"{name}: metrics reachable from the prometheus container"
        expected.add(f"{name}:{port}")
    assert targets == expected
    assert all(job.get("metrics_path", "/metrics") == "/metrics" for job in jobs.values())


def test_grafana_is_provisioned_with_prometheus_and_the_dashboard(
    deployment: Deployment,
) -> None:
    grafana = deployment.services["grafana"]
    mounts = {}
    for volume in grafana["volumes"]:
        source, target, *_mode = volume.split(":")
        mounts[target] = (COMPOSE_FILE.parent / source).resolve()
    assert mounts["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    (source,) = _load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")[
        "datasources"
    ]
    url = urlparse(source["url"])
    assert url.hostname == "prometheus"
    assert url.port in deployment.listen_ports("prometheus")
    (provider,) = _load_yaml(GRAFANA / "provisioning" / "dashboards" / "twopc.yaml")["providers"]
    assert mounts[provider["options"]["path"]] == GRAFANA / "dashboards"
    dashboard = json.loads((GRAFANA / "dashboards" / "twopc.json").read_text())
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]


# ------------------------------------------------------------------------ Dockerfile


def _instructions(dockerfile: Path) -> list[tuple[str, str]]:
    logical: list[str] = []
    current = ""
    for line in dockerfile.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # comment lines inside a continued instruction are dropped
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends in a line continuation"
    out = []
    for instruction in logical:
        keyword, _, rest = instruction.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _copy_sources(rest: str) -> tuple[list[str], list[str]]:
    """(flags, sources) of a COPY/ADD instruction, in shell or JSON form."""
    words = shlex.split(rest)
    flags = [w for w in words if w.startswith("--")]
    args = [w for w in words if not w.startswith("--")]
    if args and args[0].startswith("["):
        args = json.loads(rest[rest.index("[") :])
    assert len(args) >= 2, rest
    return flags, args[:-1]


def _dockerignore_allows(path: str, patterns: list[str]) -> bool:
    """Enough of .dockerignore semantics for an allow-list: last match wins."""
    allowed = True
    clean = path.rstrip("/")
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        if body == "*" or clean == body or clean.startswith(body + "/"):
            allowed = negate
    return allowed


def test_dockerfile_copies_only_files_of_the_repository() -> None:
    dockerfile = DOCKER / "Dockerfile"
    ignore = DOCKER / "Dockerfile.dockerignore"
    patterns = [
        line.strip()
        for line in ignore.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    copied = []
    for keyword, rest in _instructions(dockerfile):
        if keyword not in {"COPY", "ADD"}:
            continue
        flags, sources = _copy_sources(rest)
        if any(f.startswith("--from") for f in flags):
            continue  # from another stage
        for source in sources:
            assert "://" not in source, f"{keyword} {source}: nothing is fetched at build"
            assert (ROOT / source).exists(), f"{keyword} {source}: not in the repository"
            assert _dockerignore_allows(source, patterns), f"{source} is left out of the context"
            copied.append(source.rstrip("/"))
    assert {"pyproject.toml", "coordinator", "participant", "twopc_common", "twopc_pb"} <= set(
        copied
    )


def test_dockerfile_base_user_and_volumes(services: dict[str, Service]) -> None:
    dockerfile = DOCKER / "Dockerfile"
    instructions = _instructions(dockerfile)
    args = dict(
        rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest
    )
    stages = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    bases = {args.get(s.strip("${}"), s) for s in stages}
    assert bases == {"python:3.11-slim"}, bases
    last_from = max(i for i, (k, _) in enumerate(instructions) if k == "FROM")
    users = [rest for k, rest in instructions[last_from:] if k == "USER"]
    assert users, "the final stage sets a USER"
    assert users[-1].split(":")[0] not in {"root", "0"}
    text = dockerfile.read_text()
    writers = {**_running(services, "twopc-coordinator"), **_running(services, "bank-demo")}
    for name, service in writers.items():
        for volume in service.get("volumes", []):
            target = volume.split(":")[1]
            # Created (and owned by the user) in the image, so a new volume is writable.
            assert target in text, f"{name}: {target} is not created in the image"
