"""Transport security for every gRPC channel: one set of flags, one way to build server
and channel credentials.

Guarantees:
- A daemon serves mutual TLS (`--tls-cert/--tls-key/--tls-ca`): its gRPC server requires
  a client certificate signed by the CA, so a caller without one, or with one from
  another CA, fails in the handshake before any RPC runs. The only other port is the
  coordinator's optional `--token-listen` (server TLS only, bearer tokens).
- Secure by default: without TLS flags a daemon refuses to start unless given
  `--insecure`, and `--insecure` is refused unless the daemon listens on loopback.
- Certificates are re-read without a restart: the server asks for its certificate at
  every new handshake and reloads the files when they changed (so rotation means
  replacing the files; connections already open keep their session). A daemon's
  outbound channels (`ReloadingChannel`) check the files at most every
  `tls_reload_interval` seconds, before a call, and at once on SIGHUP; when they changed,
  new calls go on a new channel with the new credentials while calls already under way
  finish on the old one, closed once they are done. Files that do not load as a
  matching certificate and key (a rotation half written) are not used: the previous
  credentials stay until the next check finds a good set.
- Daemon-to-daemon channels verify the peer by its logical name (the participant or
  coordinator id, a DNS SAN of its certificate), not by the address dialled, so a
  proxy or a moved address cannot make a coordinator talk to the wrong agent.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from twopc_common.errors import TwoPCError
from twopc_common.log import EventLogger

ChannelOptions = Sequence[tuple[str, Any]]

DRAIN_MARGIN = 5.0
"""Seconds a replaced channel waits beyond its callers' longest deadline before it
closes: a call whose deadline has passed is failed by gRPC's core, but its answer
reaches the caller only when a busy event loop gets to it; closing earlier would cancel
the call under its caller instead."""


class TlsError(TwoPCError):
    """The TLS configuration is incomplete or its files cannot be read."""


@dataclass(frozen=True, slots=True)
class TlsConfig:
    """One party's credentials; all None means plaintext (`--insecure`)."""

    cert: Path | None = None
    """PEM certificate chain of this party."""
    key: Path | None = None
    """PEM private key of `cert`."""
    ca: Path | None = None
    """PEM CA certificate(s) that peers' certificates must chain to."""

    @property
    def insecure(self) -> bool:
        return self.ca is None

    def _read(self) -> tuple[bytes, bytes | None, bytes | None]:
        """(CA, key, certificate) as PEM bytes, checked: the CA file holds at least one
        certificate, the certificate file a chain whose first certificate is the key's."""
        assert self.ca is not None
        try:
            ca = self.ca.read_bytes()
            key = self.key.read_bytes() if self.key else None
            cert = self.cert.read_bytes() if self.cert else None
        except OSError as exc:
            raise TlsError(f"cannot read TLS file: {exc}") from exc
        try:
            x509.load_pem_x509_certificates(ca)
            if cert is not None and key is not None:
                leaf = x509.load_pem_x509_certificates(cert)[0]
                private = serialization.load_pem_private_key(key, None)
                spki = serialization.PublicFormat.SubjectPublicKeyInfo
                der = serialization.Encoding.DER
                if leaf.public_key().public_bytes(der, spki) != private.public_key().public_bytes(
                    der, spki
                ):
                    raise TlsError(f"{self.key} is not the key of {self.cert}")
        except (ValueError, TypeError) as exc:
            raise TlsError(
                f"cannot load TLS files {self.cert}, {self.key}, {self.ca}: {exc}"
            ) from exc
        return ca, key, cert

    def _stamp(self) -> tuple[tuple[int, int, int], ...]:
        """What tells that a file changed: replaced (inode), rewritten (time, size)."""
        stamps = []
        for path in (self.cert, self.key, self.ca):
            if path is not None:
                st = path.stat()
                stamps.append((st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)


def add_tls_flags(p: argparse.ArgumentParser, daemon: bool) -> None:
    """`--tls-cert/--tls-key/--tls-ca`, and `--insecure` for daemons."""
    p.add_argument("--tls-cert", type=Path, metavar="PEM", help="this party's certificate")
    p.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key")
    p.add_argument(
        "--tls-ca", type=Path, metavar="PEM", help="CA that peers' certificates chain to"
    )
    if daemon:
        p.add_argument(
            "--insecure",
            action="store_true",
            help="plaintext, no authentication (development only; loopback addresses only)",
        )


def is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def daemon_tls(prog: str, a: argparse.Namespace, listens: Sequence[str]) -> TlsConfig:
    """The daemon's TLS from its flags; a missing or unsafe choice ends the process with
    one line and exit status 2 (like any other bad flag)."""
    given = [a.tls_cert, a.tls_key, a.tls_ca]
    if a.insecure:
        if any(given):
            _refuse(prog, "--insecure and --tls-* exclude each other")
        for listen in listens:
            if not is_loopback(listen):
                _refuse(prog, f"--insecure is refused on {listen}: it is not a loopback address")
        return TlsConfig()
    if not all(given):
        _refuse(
            prog,
            "TLS is required: give --tls-cert, --tls-key and --tls-ca "
            "(`twopc-coordinator certs --help` makes development certificates), "
            "or --insecure on a loopback address",
        )
    # The files are read when the server is built (a missing one stops the start then).
    return TlsConfig(a.tls_cert, a.tls_key, a.tls_ca)


def client_tls(a: argparse.Namespace) -> TlsConfig:
    """A tool's TLS from its flags (plaintext when none is given)."""
    if a.tls_ca is None:
        if a.tls_cert or a.tls_key:
            raise TlsError("--tls-cert and --tls-key need --tls-ca")
        return TlsConfig()
    return TlsConfig(a.tls_cert, a.tls_key, a.tls_ca)


def _refuse(prog: str, message: str) -> None:
    sys.stderr.write(f"{prog}: {message}\n")
    sys.exit(2)


def server_credentials(
    tls: TlsConfig, require_client_cert: bool, log: EventLogger
) -> grpc.ServerCredentials:
    """Server credentials that re-read the files when they change (checked at every new
    handshake; one stat per file)."""
    assert not tls.insecure and tls.key is not None and tls.cert is not None
    stamp = [tls._stamp()]

    def configuration() -> Any:
        ca, key, cert = tls._read()
        assert key is not None and cert is not None
        return grpc.ssl_server_certificate_configuration([(key, cert)], ca)

    def fetch() -> Any:
        try:
            now = tls._stamp()
            if now == stamp[0]:
                return None
            config = configuration()
        except (OSError, TlsError, RuntimeError) as exc:
            # Half-written files during a rotation: keep serving the old certificate.
            log.warning("tls_reload_failed", error=repr(exc))
            return None
        stamp[0] = now
        log.info("tls_reloaded", cert=tls.cert)
        return config

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch, require_client_authentication=require_client_cert
    )


def channel_credentials(tls: TlsConfig, token: str | None = None) -> grpc.ChannelCredentials:
    ca, key, cert = tls._read()
    creds = grpc.ssl_channel_credentials(ca, key, cert)
    if token is not None:
        creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(token))
    return creds


def _options(options: ChannelOptions, server_name: str | None) -> list[tuple[str, Any]]:
    out = list(options)
    if server_name is not None:
        out.append(("grpc.ssl_target_name_override", server_name))
    return out


def channel(
    address: str,
    tls: TlsConfig,
    options: ChannelOptions = (),
    server_name: str | None = None,
    token: str | None = None,
) -> grpc.Channel:
    """A blocking channel; `server_name` is the name the peer's certificate must carry
    (default: the host dialled)."""
    if tls.insecure:
        if token is not None:
            raise TlsError("a bearer token is only sent over TLS: give the CA (--tls-ca)")
        return grpc.insecure_channel(address, options=list(options))
    creds = channel_credentials(tls, token)
    return grpc.secure_channel(address, creds, options=_options(options, server_name))


def aio_channel(
    address: str,
    tls: TlsConfig,
    options: ChannelOptions = (),
    server_name: str | None = None,
    token: str | None = None,
) -> grpc.aio.Channel:
    """The asyncio twin of `channel`."""
    if tls.insecure:
        if token is not None:
            raise TlsError("a bearer token is only sent over TLS: give the CA (--tls-ca)")
        return grpc.aio.insecure_channel(address, options=list(options))
    creds = channel_credentials(tls, token)
    return grpc.aio.secure_channel(address, creds, options=_options(options, server_name))


class ReloadingChannel:
    """An asyncio channel to one peer whose credentials follow this party's TLS files
    (see the module's guarantees). `current()` is the channel for the next call;
    `on_change` runs after a new channel replaced the old one. `drain` is the longest
    deadline any caller gives a call on it."""

    def __init__(
        self,
        address: str,
        tls: TlsConfig,
        options: ChannelOptions = (),
        server_name: str | None = None,
        *,
        check_interval: float,
        drain: float,
        log: EventLogger,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._address = address
        self._tls = tls
        self._options = options
        self._server_name = server_name
        self._interval = check_interval
        self._drain = drain
        self._log = log
        self._on_change = on_change
        self._stamp = None if tls.insecure else tls._stamp()
        self._channel = aio_channel(address, tls, options, server_name)
        self._next_check = time.monotonic() + check_interval
        self._retiring: dict[grpc.aio.Channel, asyncio.Task[None]] = {}
        self.generation = 0
        """How many times the channel was replaced."""

    def current(self) -> grpc.aio.Channel:
        if self._stamp is not None and time.monotonic() >= self._next_check:
            self.reload()
        return self._channel

    def reload(self) -> bool:
        """Check the files now (SIGHUP); True if a new channel replaced the old one."""
        if self._stamp is None:
            return False
        self._next_check = time.monotonic() + self._interval
        peer = self._server_name or self._address
        try:
            stamp = self._tls._stamp()
            if stamp == self._stamp:
                return False
            # Built from the files as they are now, checked; a later change is seen
            # at the next check (the stamp is taken before the files are read).
            new = aio_channel(self._address, self._tls, self._options, self._server_name)
        except (OSError, TlsError) as exc:
            self._log.warning("tls_channel_reload_failed", peer=peer, error=str(exc))
            return False
        old, self._channel, self._stamp = self._channel, new, stamp
        self.generation += 1
        # Every call carries a deadline of at most `drain`: waiting that long (and a
        # margin) fails no call that was started on the old channel.
        task = asyncio.get_running_loop().create_task(old.close(self._drain + DRAIN_MARGIN))
        self._retiring[old] = task
        task.add_done_callback(lambda _: self._retiring.pop(old, None))
        self._log.info("tls_channel_reloaded", peer=peer, address=self._address)
        self._on_change()
        return True

    async def close(self) -> None:
        """Close every channel now (the daemon is stopping)."""
        for old, task in list(self._retiring.items()):
            task.cancel()
            await old.close()
        await self._channel.close()
