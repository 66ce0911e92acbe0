"""Security, tried as an attacker would: real daemons over mutual TLS on loopback.

Without credentials nothing answers; a certificate from another CA fails the handshake;
agents obey only their coordinators (the third-party Commit race leaves the branch
prepared and the transaction atomic); clients touch only their own transactions and
keys; bearer tokens are checked; --insecure is refused off loopback.
"""

from __future__ import annotations

import asyncio
import collections
import datetime as dt
import functools
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from coordinator.client import (
    AsyncCoordinatorClient,
    CoordinatorClient,
    Outcome,
    TlsConfig,
    Transaction,
)
from tests.conftest import SystemFactory, create_tagged_rows, rows, tagged_inserts
from twopc_common import certs
from twopc_common.auth import hash_token
from twopc_common.errors import NotFound, PermissionDenied, TwoPCError, Unauthenticated
from twopc_common.tls import channel
from twopc_harness.daemons import wait_until
from twopc_harness.postgres import free_port
from twopc_harness.system import LocalSystem
from twopc_pb import coordinator_pb2 as cpb
from twopc_pb import coordinator_pb2_grpc as cgrpc
from twopc_pb import participant_pb2 as ppb
from twopc_pb import participant_pb2_grpc as pgrpc
from twopc_pb import types_pb2 as tpb

# Every RPC of both services with a request that would do something if it ran.
COORDINATOR_CALLS: dict[str, object] = {
    "Run": cpb.RunRequest(
        branches=[
            cpb.Branch(
                participant="shard1",
                statements=[tpb.Statement(sql="INSERT INTO twopc_test_rows VALUES ('intruder')")],
            )
        ]
    ),
    "RunStream": cpb.RunBatch(
        items=[
            cpb.RunItem(
                ref=1,
                request=cpb.RunRequest(
                    branches=[
                        cpb.Branch(
                            participant="shard1",
                            statements=[
                                tpb.Statement(sql="INSERT INTO twopc_test_rows VALUES ('intruder')")
                            ],
                        )
                    ]
                ),
            )
        ]
    ),
    "Begin": cpb.BeginRequest(),
    "Execute": cpb.ExecuteRequest(transaction_id="x.1.1", participant="shard1"),
    "Commit": cpb.CommitRequest(transaction_id="x.1.1"),
    "Rollback": cpb.RollbackRequest(transaction_id="x.1.1"),
    "GetTransaction": cpb.GetTransactionRequest(transaction_id="x.1.1"),
    "ListTransactions": cpb.ListTransactionsRequest(),
    "Status": cpb.StatusRequest(),
    "SetFailpoints": tpb.FailpointsRequest(spec="coordinator.before_prepare=crash"),
}
PARTICIPANT_CALLS: dict[str, object] = {
    "Execute": ppb.BranchExecuteRequest(transaction_id="x.1.1"),
    "Prepare": ppb.PrepareRequest(
        transaction_id="x.1.2",
        statements=[tpb.Statement(sql="INSERT INTO twopc_test_rows VALUES ('intruder')")],
        one_phase=True,
    ),
    "PrepareStream": ppb.PrepareBatch(
        items=[
            ppb.PrepareItem(
                ref=1,
                request=ppb.PrepareRequest(
                    transaction_id="x.1.3",
                    statements=[
                        tpb.Statement(sql="INSERT INTO twopc_test_rows VALUES ('intruder')")
                    ],
                    one_phase=True,
                ),
            )
        ]
    ),
    "Commit": ppb.BranchRef(transaction_id="x.1.1"),
    "Abort": ppb.BranchRef(transaction_id="x.1.1"),
    "Finish": ppb.FinishRequest(decisions=[ppb.Decision(transaction_id="x.1.1", commit=True)]),
    "FinishStream": ppb.FinishBatch(
        items=[
            ppb.FinishItem(
                ref=1,
                request=ppb.FinishRequest(
                    decisions=[ppb.Decision(transaction_id="x.1.1", commit=True)]
                ),
            )
        ]
    ),
    "ListPrepared": ppb.ListPreparedRequest(coordinator_id="x"),
    "WaitsFor": ppb.WaitsForRequest(),
    "ListHeuristic": ppb.ListHeuristicRequest(coordinator_id="x"),
    "Status": ppb.ParticipantStatusRequest(),
    "SetFailpoints": tpb.FailpointsRequest(spec="participant.before_prepare=crash"),
}


def test_every_rpc_is_listed() -> None:
    """The tables above cover both services, so no RPC escapes the tests below."""
    for service, calls in (
        (cpb.DESCRIPTOR.services_by_name["Coordinator"], COORDINATOR_CALLS),
        (ppb.DESCRIPTOR.services_by_name["Participant"], PARTICIPANT_CALLS),
    ):
        assert {m.name for m in service.methods} == set(calls)


def code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as caught:
        call()
    return caught.value.code(), caught.value.details() or ""


def calls(ch: grpc.Channel, service: str) -> dict[str, Callable[[], object]]:
    if service == "coordinator":
        stub: object = cgrpc.CoordinatorStub(ch)
        table = COORDINATOR_CALLS
    else:
        stub = pgrpc.ParticipantStub(ch)
        table = PARTICIPANT_CALLS

    def call(method: Callable[..., Any], request: object) -> Callable[[], object]:
        streams = ("PrepareStream", "FinishStream", "RunStream")
        if method in (getattr(stub, name, None) for name in streams):
            # a stream: read it to its end
            return lambda: list(method(iter([request]), timeout=5))
        return lambda: method(request, timeout=5)

    return {name: call(getattr(stub, name), request) for name, request in table.items()}


def issue_token(path: Path, name: str, admin: bool = False) -> str:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "coordinator",
            "token",
            "--tokens-file",
            str(path),
            "--name",
            name,
            *(["--admin"] if admin else []),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


@pytest.fixture
def token_system(make_system: SystemFactory, tmp_path: Path) -> tuple[LocalSystem, str, str]:
    """A system whose coordinator also serves bearer tokens; returns it, the token port's
    address and the token of client `app`."""
    tokens = tmp_path / "tokens"
    token = issue_token(tokens, "app")
    port = f"127.0.0.1:{free_port()}"
    system = make_system(["--token-listen", port, "--tokens-file", str(tokens)])
    create_tagged_rows(system)
    return system, port, token


def test_a_refused_shared_run_gets_the_refusal_not_a_broken_call(
    token_system: tuple[LocalSystem, str, str],
) -> None:
    """A Run over RunStream with a wrong token is UNAUTHENTICATED every time. The
    first write on a new call used to race the coordinator's refusal: when it lost,
    gRPC put its own INTERNAL in the refusal's place and the client read an
    unavailable coordinator (Unavailable, a reason to retry or fail over)."""
    system, token_port, token = token_system
    ca_only = TlsConfig(ca=system.tls("app").ca)
    answers: collections.Counter[str] = collections.Counter()

    async def attempts() -> None:
        for _ in range(40):  # a new client, so a new call, each time
            async with AsyncCoordinatorClient(token_port, tls=ca_only, token=token + "x") as c:
                try:
                    await c.run(tagged_inserts("forged-shared", ("shard1",)))
                except TwoPCError as exc:
                    answers[type(exc).__name__] += 1

    asyncio.run(attempts())
    assert answers == {"Unauthenticated": 40}, answers
    assert rows(system, "forged-shared")["shard1"] == 0


def test_no_credentials_gets_nothing_from_any_rpc(
    token_system: tuple[LocalSystem, str, str],
) -> None:
    """On the token port a call without a token is UNAUTHENTICATED, whatever the RPC;
    on the mutual-TLS ports a caller without a certificate (or in plaintext) does not
    get past the handshake. Nothing runs either way."""
    system, token_port, _ = token_system
    ca_only = TlsConfig(ca=system.tls("app").ca)
    with channel(token_port, ca_only) as ch:
        for name, call in calls(ch, "coordinator").items():
            code, details = code_of(call)
            assert code == grpc.StatusCode.UNAUTHENTICATED, (name, code, details)
            assert "no credentials" in details
    targets = [("coordinator", system.client_address, system.coordinator_id)] + [
        ("participant", d.address, shard) for shard, d in system.participants.items()
    ]
    for service, address, name in targets:
        for tls in (ca_only, TlsConfig()):
            with channel(address, tls, server_name=name) as ch:
                for method, call in calls(ch, service).items():
                    code, _ = code_of(call)
                    assert code == grpc.StatusCode.UNAVAILABLE, (service, method, code)
    assert rows(system, "intruder") == {"shard1": 0, "shard2": 0, "shard3": 0}


def test_a_certificate_from_another_ca_fails_the_handshake(
    make_system: SystemFactory, tmp_path: Path
) -> None:
    """An impostor with a certificate that names the real coordinator, or a client,
    but is signed by its own CA, is refused by every daemon."""
    system = make_system()
    create_tagged_rows(system)
    forged = certs.issue(
        tmp_path / "forged",
        [
            certs.Identity("coordinator", system.coordinator_id),
            certs.Identity("client", "app"),
        ],
    )
    real_ca = system.tls("app").ca
    impostor = forged[system.coordinator_id]
    for shard, daemon in system.participants.items():
        tls = TlsConfig(impostor.cert, impostor.key, real_ca)
        with channel(daemon.address, tls, server_name=shard) as ch:
            for method, call in calls(ch, "participant").items():
                assert code_of(call)[0] == grpc.StatusCode.UNAVAILABLE, method
    app = forged["app"]
    with channel(system.client_address, TlsConfig(app.cert, app.key, real_ca)) as ch:
        for method, call in calls(ch, "coordinator").items():
            assert code_of(call)[0] == grpc.StatusCode.UNAVAILABLE, method
    assert rows(system, "intruder") == {"shard1": 0, "shard2": 0, "shard3": 0}


def test_an_agent_obeys_only_its_coordinator(make_system: SystemFactory) -> None:
    """A client, another agent or the admin (valid certificates of the same CA) calling
    an agent's Execute, Prepare, phase 2 or ListPrepared gets PERMISSION_DENIED."""
    system = make_system()
    create_tagged_rows(system)
    for identity in ("app", "admin", "shard2"):
        with system.participant_channel("shard1", identity=identity) as ch:
            for method, call in calls(ch, "participant").items():
                if method in ("Status", "SetFailpoints"):
                    continue
                if method == "ListHeuristic" and identity == "admin":
                    continue  # operators may list heuristic decisions (below)
                code, details = code_of(call)
                assert code == grpc.StatusCode.PERMISSION_DENIED, (identity, method, code)
                assert f"may not call {method}" in details
    assert rows(system, "intruder") == {"shard1": 0, "shard2": 0, "shard3": 0}
    # ListHeuristic (read-only): the coordinators and admins.
    request = ppb.ListHeuristicRequest(coordinator_id=system.coordinator_id)
    for identity in (system.coordinator_id, "admin"):
        with system.participant_channel("shard1", identity=identity) as ch:
            assert (
                list(pgrpc.ParticipantStub(ch).ListHeuristic(request, timeout=10).decisions) == []
            )


def test_health_needs_a_certificate_of_the_ca_on_the_mutual_tls_ports(
    token_system: tuple[LocalSystem, str, str],
) -> None:
    """The health service is outside the per-RPC rules (probes must ask), but not
    outside the handshake: any certificate of the CA gets an answer, none does not. On
    the token port (server TLS only) it answers without a token."""
    system, token_port, _ = token_system
    ca_only = TlsConfig(ca=system.tls("app").ca)
    request = health_pb2.HealthCheckRequest()
    serving = health_pb2.HealthCheckResponse.SERVING
    for shard in system.participants:
        for identity in ("app", "shard2", system.coordinator_id):
            with system.participant_channel(shard, identity=identity) as ch:
                assert health_pb2_grpc.HealthStub(ch).Check(request, timeout=10).status == serving
        with channel(system.participants[shard].address, ca_only, server_name=shard) as ch:
            code, _ = code_of(lambda: health_pb2_grpc.HealthStub(ch).Check(request, timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE, shard
    with system.coordinator_channel("app") as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(request, timeout=10).status == serving
    with channel(token_port, ca_only) as ch:
        assert health_pb2_grpc.HealthStub(ch).Check(request, timeout=10).status == serving


def test_a_third_party_cannot_commit_a_prepared_branch_the_coordinator_aborts(
    make_system: SystemFactory,
) -> None:
    """The attack of the issue: while one branch is prepared and another vote is
    missing, a third party finds the branch and commits it. Refused, the branch stays
    prepared, the coordinator aborts at its prepare timeout, and no shard keeps a row."""
    system = make_system(["--prepare-timeout", "8"], ["--allow-failpoints"])
    create_tagged_rows(system)
    system.participants["shard2"].set_failpoints("participant.after_prepare_before_vote=hang")
    told: list[Outcome] = []
    work = tagged_inserts("race", ("shard1", "shard2"))
    runner = threading.Thread(target=lambda: told.append(system.client().run(work)))
    runner.start()
    try:
        with system.participant_channel("shard1") as ch:  # the test's view, as coordinator
            prepared = pgrpc.ParticipantStub(ch).ListPrepared
            request = ppb.ListPreparedRequest(coordinator_id=system.coordinator_id)
            wait_until(lambda: bool(prepared(request).branches), 20, "shard1 prepared")
            (branch,) = prepared(request).branches
        for identity in ("app", "shard2"):
            ref = ppb.BranchRef(transaction_id=branch.transaction_id)
            decision = ppb.Decision(transaction_id=branch.transaction_id, commit=True)
            with system.participant_channel("shard1", identity=identity) as ch:
                attacker = pgrpc.ParticipantStub(ch)
                for method, message in (
                    (attacker.ListPrepared, request),
                    (attacker.Commit, ref),
                    (attacker.Abort, ref),
                    (attacker.Finish, ppb.FinishRequest(decisions=[decision])),
                ):
                    code, _ = code_of(functools.partial(method, message, timeout=5))
                    assert code == grpc.StatusCode.PERMISSION_DENIED
        with system.participant_channel("shard1") as ch:
            still = pgrpc.ParticipantStub(ch).ListPrepared(request).branches
        assert [b.transaction_id for b in still] == [branch.transaction_id]
        assert rows(system, "race")["shard1"] == 0
    finally:
        runner.join(30)
        system.participants["shard2"].set_failpoints("participant.after_prepare_before_vote=off")
    assert told and not told[0].committed
    wait_until(lambda: not any(system.prepared_transactions().values()), 30, "nothing prepared")
    assert rows(system, "race") == {"shard1": 0, "shard2": 0, "shard3": 0}


def test_a_client_cannot_touch_another_clients_transaction_or_key(
    make_system: SystemFactory,
) -> None:
    system = make_system()
    create_tagged_rows(system)
    with (
        system.client(identity="app") as app,
        system.client(identity="other") as other,
        system.client(identity="admin") as admin,
    ):
        tx = app.begin()
        tx.execute("shard1", "INSERT INTO twopc_test_rows VALUES ('mine')")
        tx.execute("shard2", "INSERT INTO twopc_test_rows VALUES ('mine')")
        txid = tx.id
        with system.coordinator_channel("other") as ch:
            stub = cgrpc.CoordinatorStub(ch)
            for call in (
                lambda: stub.Execute(
                    cpb.ExecuteRequest(
                        transaction_id=txid,
                        participant="shard1",
                        statements=[tpb.Statement(sql="DELETE FROM twopc_test_rows")],
                    )
                ),
                lambda: stub.Commit(cpb.CommitRequest(transaction_id=txid)),
                lambda: stub.Rollback(cpb.RollbackRequest(transaction_id=txid)),
                lambda: stub.GetTransaction(cpb.GetTransactionRequest(transaction_id=txid)),
            ):
                code, details = code_of(call)
                # Not PERMISSION_DENIED: that would tell that the id exists.
                assert code == grpc.StatusCode.NOT_FOUND, code
                assert f"no transaction {txid} of yours" in details
        with pytest.raises(NotFound):
            other.get_transaction(txid)
        assert txid not in [t.transaction_id for t in other.list_transactions()]
        assert txid in [t.transaction_id for t in app.list_transactions()]
        assert txid in [t.transaction_id for t in admin.list_transactions()]
        assert tx.commit(wait_for_completion=True).committed
        assert app.get_transaction(txid).outcome == "committed"
        # Same key, different requests, different clients: two transactions, no clash.
        mine = app.run(tagged_inserts("key-app", ("shard1",)), idempotency_key="shared-key")
        theirs = other.run(tagged_inserts("key-other", ("shard2",)), idempotency_key="shared-key")
        assert mine.committed and theirs.committed
        assert mine.transaction_id != theirs.transaction_id
        again = other.run(tagged_inserts("key-other", ("shard2",)), idempotency_key="shared-key")
        assert again.transaction_id == theirs.transaction_id
    assert rows(system, "mine") == {"shard1": 1, "shard2": 1, "shard3": 0}
    assert rows(system, "key-app") == {"shard1": 1, "shard2": 0, "shard3": 0}
    assert rows(system, "key-other") == {"shard1": 0, "shard2": 1, "shard3": 0}


def test_bearer_tokens_are_checked(token_system: tuple[LocalSystem, str, str]) -> None:
    """The right token works and owns its transactions; a wrong one is UNAUTHENTICATED;
    the tokens file and the logs never hold the token itself."""
    system, token_port, token = token_system
    ca_only = TlsConfig(ca=system.tls("app").ca)
    with CoordinatorClient(token_port, tls=ca_only, token=token) as client:
        outcome = client.run(tagged_inserts("tokened", ("shard1", "shard2")))
        assert outcome.committed
        assert client.get_transaction(outcome.transaction_id).outcome == "committed"
    with system.client(identity="app") as same_name:  # certificate `app` is the same client
        assert same_name.get_transaction(outcome.transaction_id).outcome == "committed"
    with system.client(identity="other") as other, pytest.raises(NotFound):
        other.get_transaction(outcome.transaction_id)
    for wrong in (token + "x", "twopc_" + "A" * 43, ""):
        with (
            CoordinatorClient(token_port, tls=ca_only, token=wrong or " ") as client,
            pytest.raises(Unauthenticated, match="not valid"),
        ):
            client.run(tagged_inserts("forged", ("shard1",)))
    assert rows(system, "forged")["shard1"] == 0
    tokens_file = system.coordinator.argv[system.coordinator.argv.index("--tokens-file") + 1]  # type: ignore[union-attr]
    text = Path(tokens_file).read_text()
    assert token not in text and hash_token(token) in text
    assert token not in system.coordinator.log_tail(10**7)  # type: ignore[union-attr]


def test_failpoints_need_the_flag_and_the_admin_role(make_system: SystemFactory) -> None:
    system = make_system(["--allow-failpoints"])
    coordinator = system.coordinator
    assert coordinator is not None
    with system.coordinator_channel("app") as ch:
        code, _ = code_of(
            lambda: cgrpc.CoordinatorStub(ch).SetFailpoints(
                tpb.FailpointsRequest(spec="coordinator.before_prepare=crash")
            )
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert coordinator.set_failpoints("coordinator.before_prepare=off") == {}  # admin: allowed
    with system.participants["shard1"].admin_channel() as ch:  # admin, but no flag
        code, details = code_of(
            lambda: pgrpc.ParticipantStub(ch).SetFailpoints(
                tpb.FailpointsRequest(spec="participant.before_prepare=crash")
            )
        )
    assert code == grpc.StatusCode.PERMISSION_DENIED and "--allow-failpoints" in details


def daemon(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_insecure_is_refused_off_loopback_and_tls_is_the_default(tmp_path: Path) -> None:
    log = str(tmp_path / "d.sqlite")
    for args in (
        ["coordinator", "--id", "c", "--log", log, "--listen", f"0.0.0.0:{free_port()}"],
        ["participant", "--id", "p", "--dsn", "host=x", "--listen", f"0.0.0.0:{free_port()}"],
    ):
        done = daemon(*args, "--insecure")
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and "not a loopback address" in done.stderr
        plain = daemon(*args)
        assert plain.returncode == 2 and "TLS is required" in plain.stderr
    refused = daemon(
        "coordinator",
        "--id",
        "c",
        "--log",
        log,
        "--listen",
        f"127.0.0.1:{free_port()}",
        "--insecure",
        env={"TWOPC_FAILPOINTS": "coordinator.before_prepare=crash"},
    )
    assert refused.returncode != 0 and "--allow-failpoints" in refused.stderr


def test_a_password_never_rides_on_the_command_line(tmp_path: Path) -> None:
    secret = "s3cret-pw"
    base = ["participant", "--id", "p", "--listen", f"127.0.0.1:{free_port()}", "--insecure"]
    done = daemon(*base, "--dsn", f"host=127.0.0.1 port=1 password={secret}")
    assert done.returncode == 2 and "--dsn carries a password" in done.stderr
    dsn_file = tmp_path / "dsn"
    dsn_file.write_text(f"host=127.0.0.1 port={free_port()} password={secret} connect_timeout=2")
    done = daemon(*base, "--dsn-file", str(dsn_file))
    assert done.returncode != 0 and "cannot connect to host=127.0.0.1" in done.stderr
    assert secret not in done.stderr


def test_a_renewed_certificate_is_served_without_a_restart(
    make_system: SystemFactory, tmp_path: Path
) -> None:
    """Rotation: the coordinator's certificate is replaced in place by one of a new CA
    (with both CAs trusted meanwhile); new connections get it, no restart needed."""
    system = make_system()
    coordinator = system.coordinator
    assert coordinator is not None
    own = system.tls(system.coordinator_id)
    assert own.cert is not None and own.key is not None and own.ca is not None
    new = certs.issue(
        tmp_path / "ca2",
        [certs.Identity("coordinator", system.coordinator_id), certs.Identity("client", "app2")],
    )
    app2 = TlsConfig(new["app2"].cert, new["app2"].key, new["app2"].ca)
    with channel(system.client_address, app2) as ch:  # the old certificate: not trusted
        code, _ = code_of(lambda: cgrpc.CoordinatorStub(ch).Status(cpb.StatusRequest(), timeout=5))
    assert code == grpc.StatusCode.UNAVAILABLE
    pid = coordinator.process.pid if coordinator.process else None
    own.ca.write_bytes(own.ca.read_bytes() + new["app2"].ca.read_bytes())
    own.key.write_bytes(new[system.coordinator_id].key.read_bytes())
    own.cert.write_bytes(new[system.coordinator_id].cert.read_bytes())

    def served() -> bool:
        with channel(system.client_address, app2) as ch:
            try:
                cgrpc.CoordinatorStub(ch).Status(cpb.StatusRequest(), timeout=5)
                return True
            except grpc.RpcError:
                return False

    wait_until(served, 20, "the renewed certificate served")
    assert coordinator.process is not None and coordinator.process.pid == pid
    assert "event=tls_reloaded" in coordinator.log_tail(10**6)


def test_a_certificate_without_an_identity_is_unauthenticated(
    make_system: SystemFactory, tmp_path: Path
) -> None:
    """Signed by the right CA but naming no twopc:// identity (a host certificate of
    some other service, say): every RPC is UNAUTHENTICATED, and says why."""
    system = make_system()
    create_tagged_rows(system)
    ca = system.tls("app").ca
    assert ca is not None
    ca_key = serialization.load_pem_private_key((ca.parent / "ca.key").read_bytes(), None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    ca_cert = x509.load_pem_x509_certificate(ca.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "web")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("web.example")]), False)
        .sign(ca_key, hashes.SHA256())
    )
    (tmp_path / "web.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "web.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    web = TlsConfig(tmp_path / "web.pem", tmp_path / "web.key", ca)
    targets = [("coordinator", system.client_address, system.coordinator_id)] + [
        ("participant", d.address, shard) for shard, d in system.participants.items()
    ]
    for service, address, name in targets:
        with channel(address, web, server_name=name) as ch:
            for method, call in calls(ch, service).items():
                code, details = code_of(call)
                assert code == grpc.StatusCode.UNAUTHENTICATED, (service, method, code)
                assert "names no identity" in details
    assert rows(system, "intruder") == {"shard1": 0, "shard2": 0, "shard3": 0}


def test_a_client_cannot_roll_back_another_clients_run_in_flight(
    make_system: SystemFactory,
) -> None:
    """A one-shot Run in flight belongs to its client already (the engine knows its
    owner): another client who guesses the id cannot touch it, and its owner sees it."""
    system = make_system(["--prepare-timeout", "10"], ["--allow-failpoints"])
    create_tagged_rows(system)
    system.participants["shard2"].set_failpoints("participant.before_prepare=1*sleep(4000)")
    told: list[Outcome] = []
    work = tagged_inserts("in-flight", ("shard1", "shard2"))
    # Waits for phase 2: the rows are counted as soon as the Run is answered.
    runner = threading.Thread(
        target=lambda: told.append(system.client().run(work, wait_for_completion=True))
    )
    runner.start()
    try:
        with system.client(identity="admin") as admin:
            wait_until(lambda: bool(admin.list_transactions()), 20, "the Run in flight")
            (live,) = admin.list_transactions()
        with system.client(identity="other") as other:
            with pytest.raises(NotFound, match="of yours"):
                Transaction(other, live.transaction_id).rollback()
            with pytest.raises(NotFound, match="of yours"):
                other.get_transaction(live.transaction_id)
            assert other.list_transactions() == []
        with system.client(identity="app") as app:
            assert live.transaction_id in [t.transaction_id for t in app.list_transactions()]
    finally:
        runner.join(30)
    assert told and told[0].committed
    assert rows(system, "in-flight") == {"shard1": 1, "shard2": 1, "shard3": 0}


def test_inspect_and_bank_demo_authenticate_with_a_token_file(
    token_system: tuple[LocalSystem, str, str], tmp_path: Path
) -> None:
    """`--token-file` on the operator's and the demo's tools: the token comes from a
    file (there is no flag for it in argv) and is checked like the library's."""
    system, token_port, token = token_system
    admin_token = issue_token(
        Path(system.coordinator.argv[system.coordinator.argv.index("--tokens-file") + 1]),  # type: ignore[union-attr]
        "ops",
        admin=True,
    )
    ca = f"--tls-ca={system.tls('app').ca}"
    good, wrong = tmp_path / "ops.token", tmp_path / "wrong.token"
    good.write_text(admin_token + "\n")
    wrong.write_text(token + "x")
    log = str(system.workdir / "decisions.sqlite")
    inspect = [sys.executable, "-m", "coordinator", "inspect", "--log", log, "--json", ca]
    with system.client() as client:
        tx = client.begin()
        tx.execute("shard1", "INSERT INTO twopc_test_rows VALUES ('inspected')")
        seen = subprocess.run(
            [*inspect, "--coordinator", token_port, f"--token-file={good}"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert seen.returncode == 0, seen.stderr
        assert tx.id in [t["transaction_id"] for t in json.loads(seen.stdout)["in_flight"]]
        tx.rollback()
    refused = subprocess.run(
        [*inspect, "--coordinator", token_port, f"--token-file={wrong}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 1 and token not in refused.stdout + refused.stderr
    assert "UNAUTHENTICATED" in json.dumps(json.loads(refused.stdout)["in_flight"])
    done = subprocess.run([*inspect, "--token", token], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "--token is refused" in done.stderr
    assert token not in done.stdout + done.stderr
    tokened = tmp_path / "app.token"
    tokened.write_text(token)
    shards = [f"--shard={s}={system.dsn(s)}" for s in system.shard_names]
    demo = [sys.executable, "-m", "bank_demo", "run", "--coordinator", token_port, *shards, ca]
    common = ["--faults", "none", "--duration", "2", "--accounts", "20", "--quiet"]
    ran = subprocess.run(
        [*demo, f"--token-file={tokened}", *common, "--out", str(tmp_path / "demo")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert ran.returncode == 0, ran.stdout + ran.stderr
    report = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert report["passed"] and report["figures"]["committed"] > 0
    stopped = subprocess.run(
        [*demo, f"--token-file={wrong}", *common, "--out", str(tmp_path / "demo2")],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert stopped.returncode != 0 and "not valid" in stopped.stderr.strip().splitlines()[-1]


def test_a_client_limited_to_some_participants_touches_no_other(
    make_system: SystemFactory,
) -> None:
    """`--client-participants other=shard1`: its Runs and Executes elsewhere are refused
    before anything runs; the rest of its work, and other clients, are unaffected."""
    system = make_system(["--client-participants", "other=shard1"])
    create_tagged_rows(system)
    with system.client(identity="other") as other, system.client(identity="app") as app:
        assert other.run(tagged_inserts("limited-ok", ("shard1",))).committed
        with pytest.raises(PermissionDenied, match="may not touch participant shard2"):
            other.run(tagged_inserts("limited-refused", ("shard1", "shard2")))
        tx = other.begin()
        tx.execute("shard1", "INSERT INTO twopc_test_rows VALUES ('limited-interactive')")
        with pytest.raises(PermissionDenied, match="shard3"):
            tx.execute("shard3", "INSERT INTO twopc_test_rows VALUES ('limited-interactive')")
        assert tx.commit(wait_for_completion=True).committed  # the refusal changed nothing
        assert app.run(tagged_inserts("limited-app"), wait_for_completion=True).committed
    assert rows(system, "limited-ok") == {"shard1": 1, "shard2": 0, "shard3": 0}
    assert rows(system, "limited-refused") == {"shard1": 0, "shard2": 0, "shard3": 0}
    assert rows(system, "limited-interactive") == {"shard1": 1, "shard2": 0, "shard3": 0}
    assert rows(system, "limited-app") == {"shard1": 1, "shard2": 1, "shard3": 1}
    refused = daemon(
        "coordinator",
        "--id",
        "c",
        "--log",
        "/nonexistent/d.sqlite",
        "--insecure",
        "--participant",
        f"shard1=127.0.0.1:{free_port()}",
        "--client-participants",
        "other=shard9",
    )
    assert refused.returncode == 2 and "shard9 not configured" in refused.stderr
