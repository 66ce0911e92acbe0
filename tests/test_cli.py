"""The three programs' command lines as a new user meets them: a bad flag is a usage
error (exit status 2) with one line saying what is wrong, a daemon that cannot start
says why in one line, nothing prints a traceback, and --help and --version answer."""

from __future__ import annotations

import argparse
import contextlib
import math
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from bank_demo.__main__ import _parser as bank_demo_parser
from coordinator import __main__ as coordinator_main
from coordinator import inspect
from coordinator.config import CoordinatorConfig
from participant import __main__ as participant_main
from participant.config import ParticipantConfig
from tests.fix_cli import PROGRAMS, VALID_DSN, assert_one_line_error, cli
from twopc_common import settings
from twopc_common.errors import InvalidArgument
from twopc_common.limits import Limits
from twopc_common.log import RateLimit
from twopc_harness.postgres import PostgresCluster, free_port
from twopc_harness.system import issue_credentials


def coordinator_args(*extra: str, log: str = "/tmp/unused-decisions.sqlite") -> list[str]:
    # --insecure (loopback only): without it or TLS flags a daemon refuses to start,
    # and these tests are about the other flags.
    return ["--id", "c1", "--log", log, "--insecure", *extra]


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--listen", "localhost"], {}, "expected HOST:PORT"),
        (["--listen", ":notaport"], {}, "expected HOST:PORT"),
        (["--listen", "127.0.0.1:70000"], {}, "port 1-65535"),
        (["--participant", "shard1=localhost"], {}, "expected HOST:PORT"),
        (["--prepare-timeout", "nan"], {}, "finite number of seconds > 0, not nan"),
        (["--rpc-timeout", "inf"], {}, "finite number of seconds > 0, not inf"),
        (["--recovery-interval", "soon"], {}, "'soon' is not a number of seconds"),
        (["--log-level", "bogus"], {}, "invalid choice: 'BOGUS'"),
        ([], {"TWOPC_LOG_LEVEL": "bogus"}, "log level 'BOGUS' (from TWOPC_LOG_LEVEL)"),
        (["--max-in-flight", "0"], {}, "--max-in-flight must be at least 1, not 0"),
        (["--deadlock-retries", "-1"], {}, "--deadlock-retries must be at least 0, not -1"),
        (["--phase2-backoff-max", "0.01"], {}, "--phase2-backoff-max (0.01s) is below"),
    ],
    ids=[
        "listen-no-port",
        "listen-bad-port",
        "listen-port-range",
        "participant-no-port",
        "nan",
        "inf",
        "not-a-number",
        "log-level",
        "log-level-env",
        "max-in-flight-zero",
        "negative-deadlock-retries",
        "backoff-cap-below-first-delay",
    ],
)
def test_coordinator_usage_errors(args: list[str], env: dict[str, str], message: str) -> None:
    done = cli("twopc-coordinator", *coordinator_args(*args), env=env)
    assert_one_line_error(done, "twopc-coordinator", message, 2)


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--dsn", "host=db1 nonsense"], {}, "is not a libpq connection string"),
        (["--listen", "localhost"], {}, "expected HOST:PORT"),
        (["--pool-min-size", "5", "--pool-max-size", "2"], {}, "larger than pool_max_size"),
        (["--pool-max-size", "0"], {}, "must be at least 1, not 0"),
        (["--recovery-grace", "-1"], {}, "finite number of seconds >= 0, not -1.0"),
        (["--lock-timeout", "nan"], {}, "finite number of seconds > 0, not nan"),
        (["--coordinator", "c1=:7000"], {}, "expected HOST:PORT"),
        (["--log-level", "bogus"], {}, "invalid choice: 'BOGUS'"),
        ([], {"TWOPC_LOG_LEVEL": "loud"}, "log level 'LOUD' (from TWOPC_LOG_LEVEL)"),
        (["--interactive-reserve", "-1"], {}, "--interactive-reserve must be at least 0, not -1"),
    ],
    ids=[
        "dsn",
        "listen",
        "pool-min-above-max",
        "pool-zero",
        "negative-grace",
        "nan",
        "coordinator-address",
        "log-level",
        "log-level-env",
        "negative-reserve",
    ],
)
def test_participant_usage_errors(args: list[str], env: dict[str, str], message: str) -> None:
    base = ["--id", "p1", "--dsn", VALID_DSN, "--insecure"]
    done = cli("twopc-participant", *base, *args, env=env)
    assert_one_line_error(done, "twopc-participant", message, 2)


def test_config_dataclasses_refuse_what_the_command_lines_refuse() -> None:
    with pytest.raises(InvalidArgument, match="recovery_grace"):
        ParticipantConfig(id="p1", dsn="", recovery_grace=-1)
    with pytest.raises(InvalidArgument, match="pool_min_size"):
        ParticipantConfig(id="p1", dsn="", pool_min_size=3, pool_max_size=2)
    with pytest.raises(InvalidArgument, match="libpq"):
        ParticipantConfig(id="p1", dsn="host=x nonsense")
    with pytest.raises(InvalidArgument, match="prepare_timeout"):
        CoordinatorConfig(id="c1", log_path="x", prepare_timeout=math.nan)
    with pytest.raises(InvalidArgument, match="listen"):
        CoordinatorConfig(id="c1", log_path="x", listen="localhost")


def test_config_dataclasses_refuse_contradictory_settings() -> None:
    with pytest.raises(InvalidArgument, match="health_timeout must be a finite number"):
        CoordinatorConfig(id="c1", log_path="x", health_timeout=0)
    with pytest.raises(InvalidArgument, match="health_interval must be a finite number"):
        ParticipantConfig(id="p1", dsn="", health_interval=-1)
    with pytest.raises(InvalidArgument, match="below phase2_backoff_initial"):
        CoordinatorConfig(id="c1", log_path="x", phase2_backoff_initial=2, phase2_backoff_max=1)
    with pytest.raises(InvalidArgument, match="max_in_flight must be at least 1"):
        CoordinatorConfig(id="c1", log_path="x", max_in_flight=0)
    with pytest.raises(InvalidArgument, match=r"max_message_bytes \(65536\) leaves no room"):
        Limits(max_message_bytes=64 * 1024)
    with pytest.raises(InvalidArgument, match="max_phase2_batch must be at least 1"):
        Limits(max_phase2_batch=0)


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_coordinator_on_a_port_in_use_fails_before_touching_its_log(
    busy_port: int, tmp_path: Path
) -> None:
    log = tmp_path / "decisions.sqlite"
    done = cli(
        "twopc-coordinator", *coordinator_args("--listen", f"127.0.0.1:{busy_port}", log=str(log))
    )
    assert_one_line_error(done, "twopc-coordinator", f"cannot listen on 127.0.0.1:{busy_port}", 1)
    assert not log.exists(), "the epoch was bumped by a coordinator that never served"


def test_coordinator_on_an_address_it_does_not_own_fails_in_one_line(tmp_path: Path) -> None:
    # 192.0.2.0/24 is TEST-NET-1: never assigned to this machine. Not loopback, so
    # with TLS (--insecure is refused there).
    own = issue_credentials(tmp_path / "certs", ["c1"], [])["c1"]
    done = cli(
        "twopc-coordinator",
        *["--id", "c1", "--log", str(tmp_path / "d.sqlite"), "--listen", "192.0.2.1:7000"],
        *[f"--tls-cert={own.cert}", f"--tls-key={own.key}", f"--tls-ca={own.ca}"],
    )
    assert_one_line_error(done, "twopc-coordinator", "cannot listen on 192.0.2.1:7000", 1)


def test_participant_on_a_port_in_use_fails_in_one_line(
    busy_port: int, clusters: list[PostgresCluster]
) -> None:
    dsn = clusters[0].dsn
    done = cli(
        "twopc-participant",
        *["--id", "p1", "--dsn", dsn, "--listen", f"127.0.0.1:{busy_port}", "--insecure"],
    )
    assert_one_line_error(done, "twopc-participant", f"cannot listen on 127.0.0.1:{busy_port}", 1)


def test_a_password_in_the_dsn_is_never_shown() -> None:
    dsn = f"host=127.0.0.1 port={free_port()} user=app password=hunter2 connect_timeout=2"
    # A password is refused on the command line (the process list shows argv)...
    refused = cli("twopc-participant", "--id", "p1", "--dsn", dsn, "--insecure")
    assert_one_line_error(refused, "twopc-participant", "--dsn carries a password", 2)
    assert "hunter2" not in refused.stderr
    # ... and where it may go (TWOPC_DSN, --dsn-file), a failed connect masks it.
    done = cli("twopc-participant", "--id", "p1", "--insecure", env={"TWOPC_DSN": dsn})
    assert_one_line_error(done, "twopc-participant", "cannot connect to host=127.0.0.1", 1)
    assert "hunter2" not in done.stderr
    checked = cli("bank-demo", "check", f"--shard=shard1={dsn}")
    assert_one_line_error(checked, "bank-demo", "shard shard1 does not answer", 1)
    assert "hunter2" not in checked.stdout + checked.stderr


def test_redaction_masks_every_form_of_password() -> None:
    assert settings.redact("cannot connect to 'host=x password=wrong user=a'") == (
        "cannot connect to 'host=x password=*** user=a'"
    )
    assert settings.redact("host=x password = 'a b' user=a") == "host=x password = *** user=a"
    assert settings.redact("postgresql://app:s3cret@db1/bank") == "postgresql://app:***@db1/bank"
    assert settings.describe_dsn("host=db1 dbname=bank user=app password=x") == (
        "host=db1 port=5432 dbname=bank user=app"
    )


@pytest.mark.parametrize("prog", sorted(PROGRAMS))
def test_version(prog: str) -> None:
    done = cli(prog, "--version")
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(rf"{prog} \d+\.\d+\.\d+", done.stdout.strip()), done.stdout


def _parsers() -> dict[str, argparse.ArgumentParser]:
    """Every parser of the three programs, by the command that shows its help."""
    found = {
        "twopc-coordinator": coordinator_main.parser(),
        "twopc-participant": participant_main.parser(),
        "twopc-coordinator inspect": inspect.parser(),
        "bank-demo": bank_demo_parser(),
    }
    for action in found["bank-demo"]._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found[f"bank-demo {name}"] = sub
    return found


def test_help_explains_every_flag_and_shows_no_empty_default() -> None:
    parsers = _parsers()
    assert len(parsers) == 6
    for name, parser in parsers.items():
        for action in parser._actions:
            if action.option_strings and not isinstance(action, argparse._HelpAction):
                assert action.help, f"{name} {action.option_strings[0]} has no help"
        text = parser.format_help()
        assert "(default: None)" not in text and "(default: [])" not in text, name
        assert "(default: False)" not in text, name
        for action in parser._actions:
            if action.option_strings and action.nargs is None and action.type is not None:
                assert action.metavar, f"{name} {action.option_strings[0]} has no placeholder"


def test_help_shows_the_rules_and_defaults_a_new_user_needs() -> None:
    parsers = _parsers()
    coordinator = parsers["twopc-coordinator"].format_help()
    assert "1-24 of [A-Za-z0-9_-]" in coordinator and "(repeatable)" in coordinator
    participant = parsers["twopc-participant"].format_help()
    assert "1-32 of [A-Za-z0-9_-]" in participant and "--pool-max-size N" in participant
    assert "CREATE on" in participant
    run = parsers["bank-demo run"].format_help()
    for default in ("(default: 3)", "(default: 100)", "(default: 30.0)", "(default: 16)"):
        assert default in run, default
    assert "--reset" in run
    assert "(repeatable)" in parsers["bank-demo check"].format_help()


def test_a_rate_limited_warning_is_due_once_per_interval_and_key() -> None:
    now = [0.0]
    limit = RateLimit(60.0, clock=lambda: now[0])
    assert limit.due("a") and limit.due("b")
    assert not limit.due("a")
    now[0] = 59.9
    assert not limit.due("a")
    now[0] = 60.0
    assert limit.due("a") and not limit.due("a")


def test_coordinator_with_its_log_in_a_missing_folder_says_which(tmp_path: Path) -> None:
    log = tmp_path / "nowhere" / "decisions.sqlite"
    done = cli(
        "twopc-coordinator",
        *coordinator_args("--listen", f"127.0.0.1:{free_port()}", log=str(log)),
    )
    assert_one_line_error(done, "twopc-coordinator", f"folder {log.parent} does not exist", 1)


README = Path(__file__).resolve().parent.parent / "README.md"
_EMPTY_DEFAULTS: tuple[object, ...] = (None, False, [], "", argparse.SUPPRESS)


def _readme_table(header: str) -> dict[str, tuple[str, str]]:
    """README's flags table headed `| {header} | default | meaning |`: each flag's
    default cell and meaning cell (a row may list several flags, with one default
    each, `2 / 20`, or one for all)."""
    lines = README.read_text().splitlines()
    start = lines.index(f"| {header} | default | meaning |") + 2
    table: dict[str, tuple[str, str]] = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        first, default, meaning = (c.strip() for c in re.split(r"(?<!\\)\|", line)[1:4])
        flags = re.findall(r"`(--[a-z0-9-]+)", first)
        defaults = [d.strip() for d in default.split(" / ")]
        if len(defaults) != len(flags):
            defaults = [default] * len(flags)
        for flag, value in zip(flags, defaults, strict=True):
            assert flag not in table, f"README lists {flag} twice in the {header} table"
            table[flag] = (value, meaning)
    return table


def _same_default(action: argparse.Action, cell: str) -> bool:
    if action.required:
        return cell.startswith("required")
    if action.default in _EMPTY_DEFAULTS:
        return True  # the cell says in words what leaving the flag out means
    if isinstance(action.default, int | float) and not isinstance(action.default, bool):
        with contextlib.suppress(ValueError):
            return float(cell) == float(action.default)
        return False
    return cell == str(action.default)


@pytest.mark.parametrize(
    ("prog", "header"),
    [("twopc-coordinator", "coordinator flag"), ("twopc-participant", "agent flag")],
)
def test_the_readme_flag_tables_list_every_flag_with_its_default(
    prog: str, header: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for variable in ("TWOPC_LOG_FORMAT", "TWOPC_LOG_LEVEL"):
        monkeypatch.delenv(variable, raising=False)
    table = _readme_table(header)
    shared = _readme_table("coordinator flag")
    parser = _parsers()[prog]
    flags = {
        action.option_strings[-1]: action
        for action in parser._actions
        if action.option_strings and not isinstance(action, argparse._HelpAction)
    }
    assert sorted(set(flags) - set(table)) == [], f"{prog} flags missing from README"
    assert sorted(set(table) - set(flags)) == [], f"README lists flags {prog} does not have"
    for flag, action in flags.items():
        default, meaning = table[flag]
        if "as for the coordinator" in meaning:
            default, _ = shared[flag]
        assert _same_default(action, default), (
            f"README says {flag} defaults to {default!r}, {prog} to {action.default!r}"
        )
