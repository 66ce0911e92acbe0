"""Who is calling, and may they: authentication and per-RPC authorization for both
daemons.

Identities. A certificate names its holder with a URI SAN `twopc://KIND/NAME`, KIND one
of coordinator, participant, client (`twopc_common.certs` issues such certificates;
another CA must issue the same SAN). A client may instead present a bearer token
(`authorization: Bearer ...`) on the coordinator's token port; tokens are kept only as
SHA-256 hashes in a tokens file, one `NAME sha256:HEX [admin]` per line, re-read when
the file changes. A client identity is admin when the daemon names it with `--admin` or
its token line says `admin`.

Authorization. `guard` wraps a servicer so that every RPC first authenticates the
caller (UNAUTHENTICATED if it cannot) and then asks the service's rule for that method
(PERMISSION_DENIED if refused) before the servicer runs: a refused call changes
nothing. Every method of the service needs a rule, checked when the guard is built, so a
new RPC cannot be served unguarded by accident. The servicer reads the caller with
`caller()`. The standard health and reflection services, which every server also
carries (`twopc_common.server`), are not guarded: they name no transaction and change
nothing, and the TLS handshake already requires a certificate from the CA on the
mutual-TLS ports.

With `--insecure` there is no authentication: every caller is `INSECURE`, allowed
everything (loopback development only, see `twopc_common.tls`).
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import hashlib
import os
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from twopc_common.errors import TwoPCError, Unauthenticated
from twopc_common.ids import check_name
from twopc_common.log import EventLogger

URI_PREFIX = "twopc://"
KINDS = ("coordinator", "participant", "client")


class TokenFileError(TwoPCError):
    """The tokens file cannot be read or has a malformed line, or a client's token file
    cannot be read or does not hold one token."""


@dataclass(frozen=True, slots=True)
class Principal:
    kind: str
    """coordinator, participant or client."""
    name: str
    admin: bool = False
    unrestricted: bool = False
    """Only for `--insecure` daemons: no identity is known, nothing is refused."""

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"

    def is_(self, kind: str, names: Mapping[str, Any] | None = None) -> bool:
        return self.unrestricted or (self.kind == kind and (names is None or self.name in names))


INSECURE = Principal("client", "insecure", admin=True, unrestricted=True)

_current: contextvars.ContextVar[Principal] = contextvars.ContextVar("twopc_principal")


def caller() -> Principal:
    """The authenticated caller of the RPC being served."""
    return _current.get()


def hash_token(token: str) -> str:
    return "sha256:" + hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A random bearer token (256 bits)."""
    return "twopc_" + secrets.token_urlsafe(32)


class TokenFile:
    """Hashed bearer tokens, re-read when the file's modification time changes."""

    def __init__(self, path: Path, log: EventLogger) -> None:
        self.path = path
        self._log = log
        self._stamp = -1.0
        self._by_hash: dict[str, tuple[str, bool]] = {}
        self._reload()

    def _reload(self) -> None:
        try:
            stamp = self.path.stat().st_mtime
            if stamp == self._stamp:
                return
            text = self.path.read_text()
        except OSError as exc:
            raise TokenFileError(f"cannot read tokens file: {exc}") from exc
        by_hash = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            if (
                len(fields) not in (2, 3)
                or not fields[1].startswith("sha256:")
                or (len(fields) == 3 and fields[2] != "admin")
            ):
                raise TokenFileError(
                    f"{self.path} line {number}: expected `NAME sha256:HEX [admin]`"
                )
            by_hash[fields[1]] = (fields[0], len(fields) == 3)
        self._by_hash, self._stamp = by_hash, stamp

    def lookup(self, token: str) -> tuple[str, bool] | None:
        try:
            self._reload()
        except TokenFileError as exc:  # keep the last good table during a rewrite
            self._log.warning("tokens_reload_failed", error=str(exc))
        return self._by_hash.get(hash_token(token))


class Authenticator:
    """Turns a call's transport and metadata into a Principal."""

    def __init__(
        self, secure: bool, admins: frozenset[str] = frozenset(), tokens: TokenFile | None = None
    ) -> None:
        self._secure = secure
        self._admins = admins
        self._tokens = tokens

    def authenticate(self, context: grpc.aio.ServicerContext[Any, Any]) -> Principal:
        if not self._secure:
            return INSECURE
        peer = context.auth_context()
        for uri in peer.get("peer_uri", []):
            text = uri.decode(errors="replace")
            kind, _, name = text.removeprefix(URI_PREFIX).partition("/")
            if text.startswith(URI_PREFIX) and kind in KINDS and name:
                return Principal(
                    kind, _checked(name), admin=kind == "client" and name in self._admins
                )
        if "x509_subject" in peer:
            raise Unauthenticated(
                "the client certificate names no identity: it needs a URI SAN "
                "twopc://coordinator|participant|client/NAME"
            )
        for key, value in context.invocation_metadata() or ():
            if key != "authorization":
                continue
            scheme, _, token = str(value).partition(" ")
            found = self._tokens.lookup(token) if self._tokens is not None else None
            if scheme.lower() != "bearer" or found is None:
                raise Unauthenticated("the bearer token is not valid")
            name, admin = found
            return Principal("client", _checked(name), admin=admin or name in self._admins)
        raise Unauthenticated(
            "no credentials: present a client certificate (twopc://KIND/NAME) or a bearer token"
        )


def _checked(name: str) -> str:
    """An identity name as owners and key scopes use it: `/` would make the scoped key
    `NAME/KEY` ambiguous (`a` with key `b/c` against `a/b` with key `c`)."""
    if "/" in name or not name.isprintable():
        raise Unauthenticated(f"identity name {name!r} is not valid: no `/` or control characters")
    return name


Rule = Callable[[Principal], bool]


def guard(
    servicer: Any,
    service: Any,
    authenticator: Authenticator,
    rules: Mapping[str, Rule],
    log: EventLogger,
) -> Any:
    """`servicer` with every method of `service` (a protobuf ServiceDescriptor) behind
    authentication and its rule."""
    methods = {m.name for m in service.methods}
    if set(rules) != methods:
        raise AssertionError(f"authorization rules for {service.name} differ: {rules} vs {methods}")
    guarded = _Guarded()
    for name, rule in rules.items():
        setattr(guarded, name, _guarded(getattr(servicer, name), name, rule, authenticator, log))
    return guarded


class _Guarded:
    """The object gRPC's generated `add_*Servicer_to_server` reads methods from."""


def _guarded(
    method: Callable[[Any, Any], Awaitable[Any]],
    name: str,
    rule: Rule,
    authenticator: Authenticator,
    log: EventLogger,
) -> Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Awaitable[Any]]:
    @functools.wraps(method)
    async def call(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        try:
            principal = authenticator.authenticate(context)
        except Unauthenticated as exc:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
        if not rule(principal):
            log.warning("permission_denied", method=name, caller=principal, peer=context.peer())
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"{principal} may not call {name}"
            )
        _current.set(principal)
        return await method(request, context)

    return call


def add_token_flag(p: argparse.ArgumentParser) -> None:
    """`--token-file` for client tools: the token is read from a file, never from argv
    (which every user of the machine can read in the process list)."""
    p.add_argument(
        "--token-file",
        type=Path,
        metavar="PATH",
        help="a file holding this client's bearer token (`twopc-coordinator token` prints "
        "one), for the coordinator's --token-listen port; needs --tls-ca (server TLS)",
    )
    # Without it, argparse would take `--token SECRET` as an abbreviation of
    # --token-file and echo the secret in its error.
    p.add_argument("--token", action=_RefuseToken, nargs="?", help=argparse.SUPPRESS)


class _RefuseToken(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        parser.error(
            "--token is refused: a token on the command line is visible to every user "
            "of the machine (the process list); put it in a file and give --token-file PATH"
        )


def read_token_file(path: Path | None) -> str | None:
    """The bearer token in `path` (surrounding whitespace ignored); None without a path."""
    if path is None:
        return None
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenFileError(f"cannot read the token file: {exc}") from exc
    if not token or any(c.isspace() for c in token):
        raise TokenFileError(f"token file {path} must hold exactly one token")
    return token


def token_main(argv: list[str]) -> None:
    """`twopc-coordinator token`: issue a bearer token; only its hash is stored."""
    p = argparse.ArgumentParser(
        prog="twopc-coordinator token",
        description="Issue a bearer token for a client: appends `NAME sha256:HEX [admin]` "
        "to the tokens file and prints the token once (it is stored nowhere). "
        "To revoke, delete the line; the coordinator re-reads the file when it changes.",
    )
    p.add_argument("--tokens-file", required=True, type=Path, help="file to append to")
    p.add_argument("--name", required=True, help="the client identity the token stands for")
    p.add_argument("--admin", action="store_true", help="give the token the admin role")
    a = p.parse_args(argv)
    try:
        name = check_name("client", a.name)
    except TwoPCError as exc:
        p.error(str(exc))
    token = new_token()
    line = f"{name} {hash_token(token)}{' admin' if a.admin else ''}\n"
    with open(a.tokens_file, "a", opener=lambda path, flags: os.open(path, flags, 0o600)) as f:
        f.write(line)
    print(token)
