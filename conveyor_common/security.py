"""TLS, mutual TLS and bearer tokens for the three services.

A server is open and plaintext only when given no certificate and no token
file (a direct local run on loopback). With `--tls-cert/--tls-key` it serves
TLS; with `--tls-ca` too, every client must present a certificate that CA
signed (mutual TLS), and `--tls-allowed-names` narrows that to named peers.
With `--auth-token-file`, a call must carry `authorization: Bearer <token>`
for one of the file's tokens. Where both a peer name list and tokens are set,
either admits a call: the worker and the gateway accept the scheduler by its
certificate or by its own token.

Certificates and token files are read again when they change on disk, so
rotating either (cert-manager, a Kubernetes Secret, a file swapped in place)
needs no restart. The scheduler's own client certificate is the exception: a
channel keeps the certificate it was made with until the process restarts.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from prometheus_client import Counter

log = structlog.get_logger("security")

AUTHORIZATION_KEY = "authorization"
# The scheduler's HTTP front door sends its server's local secret under this
# key on the private Unix socket (conveyor_common/server.private_socket).
LOCAL_KEY = "x-conveyor-local"
# Probes cannot present tokens or certificates; health says nothing secret.
OPEN_METHOD_PREFIXES = ("/grpc.health.v1.Health/",)
# How often a changed certificate or token file is noticed, at most, and
# how old its last write must be before it is read (so never half-written).
RELOAD_CHECK_SECONDS = 1.0
SETTLE_SECONDS = 1.0
# A shorter token is a password someone typed, not a secret: refused.
MIN_TOKEN_CHARS = 16
MAX_TOKENS = 1024

REJECTED = Counter(
    "conveyor_auth_rejected_total",
    "Calls refused for missing or wrong credentials.",
    ["grpc_service", "grpc_method", "grpc_code", "reason"],
)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class SecurityConfigError(ValueError):
    """A certificate, key or token file that cannot be used; the message says which."""


class Settled:
    """Says when a watched set of files has changed and its newest write is
    at least a second old: a file rewritten in place is taken once its
    writer is done, never half-written (empty, or a token cut short). It
    looks at the files at most once every RELOAD_CHECK_SECONDS; asked more
    often, it says no change."""

    def __init__(self, paths: list[str]):
        self._paths = paths
        self._current = _stamps(paths)
        self._looked = time.monotonic()

    def changed(self) -> bool:
        now = time.monotonic()
        if now - self._looked < RELOAD_CHECK_SECONDS:
            return False
        self._looked = now
        stamp = _stamps(self._paths)
        if stamp == self._current:
            return False
        newest = max((s[2] for s in stamp if s is not None), default=0) / 1e9
        if time.time() - newest < SETTLE_SECONDS:
            return False  # still being written, perhaps: look again later
        self._current = stamp
        return True


class _WatchedFile:
    """A file's content, re-read once its (inode, size, mtime) has changed
    and settled (Settled). `parse` turns bytes into the value; a file that
    fails to read or parse keeps the previous value, with an error logged."""

    def __init__(self, path: str, parse: Callable[[bytes], object]):
        self.path = path
        self._parse = parse
        self._lock = threading.Lock()
        self._settled = Settled([path])
        try:
            self.value = parse(Path(path).read_bytes())
        except OSError as e:
            raise SecurityConfigError(f"cannot read {path}: {e.strerror}") from None

    def current(self) -> object:
        with self._lock:
            if not self._settled.changed():
                return self.value
            try:
                value = self._parse(Path(self.path).read_bytes())
            except (OSError, SecurityConfigError) as e:
                log.error("reload failed; keeping the previous", path=self.path, error=str(e))
                return self.value
            self.value = value
            log.info("reloaded", path=self.path)
            return value


def _token_lines(data: bytes, path: str) -> list[str]:
    tokens = []
    for line in data.decode("utf-8", "replace").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if len(line) < MIN_TOKEN_CHARS or any(c.isspace() for c in line):
            raise SecurityConfigError(
                f"{path}: a token must be at least {MIN_TOKEN_CHARS} characters with no "
                "spaces (e.g. `openssl rand -hex 32`)"
            )
        tokens.append(line)
    if len(tokens) > MAX_TOKENS:
        raise SecurityConfigError(f"{path}: more than {MAX_TOKENS} tokens")
    return tokens


class TokenSet:
    """The tokens a server accepts: one per line in a file (blank lines and
    `#` comments skipped). Tokens are kept as SHA-256 digests and compared in
    constant time against every one, so neither the time nor an early exit
    tells a caller how close a guess came. An empty file admits no one."""

    def __init__(self, path: str):
        def digests(data: bytes) -> tuple[bytes, ...]:
            return tuple(hashlib.sha256(t.encode()).digest() for t in _token_lines(data, path))

        self._file = _WatchedFile(path, digests)
        if not self._file.value:
            log.warning("the token file holds no tokens: every call is refused", path=path)

    @property
    def path(self) -> str:
        return self._file.path

    def accepts(self, token: str) -> bool:
        presented = hashlib.sha256(token.encode()).digest()
        found = False
        for digest in self._file.current():
            found |= hmac.compare_digest(presented, digest)
        return found


class ClientToken:
    """The token a client presents, from the first token line of a file;
    read again when the file changes (rotation: add the new token to the
    servers' files, swap this file, then drop the old token)."""

    def __init__(self, path: str):
        def first(data: bytes) -> str:
            tokens = _token_lines(data, path)
            if not tokens:
                raise SecurityConfigError(f"{path} holds no token")
            return tokens[0]

        self._file = _WatchedFile(path, first)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION_KEY, f"Bearer {self._file.current()}"),)


class StaticToken:
    """A token given as a value (the CLI's CONVEYOR_TOKEN)."""

    def __init__(self, value: str):
        self._value = value.strip()

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((AUTHORIZATION_KEY, f"Bearer {self._value}"),)


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise SecurityConfigError(f"cannot read the {what} {path}: {e.strerror}") from None


@dataclass(frozen=True)
class TlsFiles:
    """PEM files: this side's certificate chain and key, and the CA that
    signs the peers it trusts (None: the server does not ask for client
    certificates; a client trusts the system's roots)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None

    def __post_init__(self) -> None:
        if bool(self.cert) != bool(self.key):
            raise SecurityConfigError("a TLS certificate needs its key, and a key its certificate")
        for path, what in ((self.cert, "certificate"), (self.key, "key"), (self.ca, "CA")):
            if path:
                _read(path, what)

    def _server_config(self):
        return grpc.ssl_server_certificate_configuration(
            [(_read(self.key, "key"), _read(self.cert, "certificate"))],
            root_certificates=_read(self.ca, "CA") if self.ca else None,
        )

    def server_credentials(self) -> grpc.ServerCredentials:
        """TLS, mutual when a CA is set. The files are looked at again on each
        new handshake (at most once a second) and served anew when changed."""
        if not self.cert:
            raise SecurityConfigError("serving TLS needs --tls-cert and --tls-key")
        settled = Settled([p for p in (self.cert, self.key, self.ca) if p])

        def fetch():
            # grpc calls this before every handshake; None keeps the current config.
            if not settled.changed():
                return None
            try:
                config = self._server_config()
            except SecurityConfigError as e:
                log.error("certificate reload failed; keeping the previous one", error=str(e))
                return None
            log.info("certificate reloaded", cert=self.cert)
            return config

        return grpc.dynamic_ssl_server_credentials(
            self._server_config(), fetch, require_client_authentication=bool(self.ca)
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """A client's: trust `ca`, and present `cert`/`key` when set (mutual TLS)."""
        return grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "CA") if self.ca else None,
            private_key=_read(self.key, "key") if self.key else None,
            certificate_chain=_read(self.cert, "certificate") if self.cert else None,
        )


def _stamps(paths: list[str]) -> tuple:
    out = []
    for path in paths:
        try:
            s = os.stat(path)
            out.append((s.st_ino, s.st_size, s.st_mtime_ns))
        except OSError:
            out.append(None)
    return tuple(out)


@dataclass(frozen=True)
class ServerSecurity:
    """How a server is reached: TLS (mutual when `tls.ca`), the peer names its
    client certificates may carry (empty: any the CA signed), and the tokens
    it accepts. `health_port` serves grpc.health.v1 alone in plaintext, for
    probes that speak neither TLS nor tokens (Kubernetes' gRPC probes)."""

    tls: TlsFiles | None = None
    allowed_names: frozenset[str] = frozenset()
    tokens: TokenSet | None = None
    health_port: int = 0

    def __post_init__(self) -> None:
        if self.allowed_names and not (self.tls and self.tls.ca):
            raise SecurityConfigError(
                "--tls-allowed-names needs --tls-ca: peer names come from client certificates"
            )

    @property
    def authenticates(self) -> bool:
        return bool(self.tokens or (self.tls and self.tls.ca))

    def interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        return [AuthInterceptor(self)] if self.authenticates else []

    def warn_if_exposed(self, service: str, host: str) -> None:
        if host in LOOPBACK_HOSTS:
            return
        if self.tls is None:
            log.warning(
                "listening beyond loopback without TLS: traffic can be read and changed on "
                "the way (give --tls-cert and --tls-key)",
                service=service,
                host=host,
            )
        if not self.authenticates:
            log.warning(
                "listening beyond loopback with no authentication: anyone who reaches the "
                "port can use it (give --auth-token-file, or --tls-ca for client certificates)",
                service=service,
                host=host,
            )


@dataclass(frozen=True)
class ClientSecurity:
    """How the scheduler reaches the worker and the gateway: TLS (trusting
    `tls.ca`, presenting `tls.cert`), and a token to send. `server_name`
    overrides the name checked against the server's certificate (default:
    the target's host)."""

    tls: TlsFiles | None = None
    token: ClientToken | StaticToken | None = None
    server_name: str = ""

    def channel(self, target: str, options: Iterable[tuple[str, object]]) -> grpc.aio.Channel:
        options = list(options)
        if self.tls is None:
            if self.token is not None and _host_of(target) not in LOOPBACK_HOSTS:
                log.warning(
                    "sending a token in plaintext: give the target's CA to connect with TLS",
                    target=target,
                )
            return grpc.aio.insecure_channel(target, options=options)
        if self.server_name:
            options.append(("grpc.ssl_target_name_override", self.server_name))
        return grpc.aio.secure_channel(target, self.tls.channel_credentials(), options=options)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return self.token.metadata() if self.token else ()


def _host_of(target: str) -> str:
    """`dns:///name:port`, `name:port`, `[::1]:port` -> the host."""
    address = target.split("///", 1)[-1]
    host = address.rsplit(":", 1)[0] if address.count(":") == 1 or "]" in address else address
    return host.strip("[]")


def bearer_token(metadata: Iterable[tuple[str, str]] | None) -> str | None:
    """The token of an `authorization: Bearer <token>` entry; None without one."""
    for key, value in metadata or ():
        if key == AUTHORIZATION_KEY and isinstance(value, str):
            scheme, _, token = value.partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return ""  # present, but not a bearer token
    return None


def peer_names(context) -> set[str]:
    """The DNS names and common name of the client certificate, if any (as
    the HTTP front door reads them: IP, URI and email SANs do not count)."""
    auth = context.auth_context() or {}
    names = set()
    for key in ("peer_dns", "x509_common_name"):
        for value in auth.get(key, ()):
            names.add(value.decode() if isinstance(value, bytes) else str(value))
    return names


def authorization_metadata(header: str | None) -> tuple[tuple[str, str], ...]:
    """An HTTP Authorization header as the gRPC metadata `judge` reads."""
    return ((AUTHORIZATION_KEY, header),) if header is not None else ()


@dataclass
class Verdict:
    code: grpc.StatusCode
    reason: str
    message: str


def judge(security: ServerSecurity, metadata, names: set[str]) -> Verdict | None:
    """None when the call may go on; else why not. `names` are the verified
    client certificate's (empty without mutual TLS)."""
    if security.tls and security.tls.ca:
        # The handshake already required a certificate the CA signed.
        if not security.allowed_names or names & security.allowed_names:
            return None
    token = bearer_token(metadata)
    if security.tokens is not None:
        if token and security.tokens.accepts(token):
            return None
        if token is None:
            reason, message = "missing", "missing credentials: send `authorization: Bearer <token>`"
        else:
            reason, message = "invalid", "the bearer token is not valid"
        if not names:
            return Verdict(grpc.StatusCode.UNAUTHENTICATED, reason, message)
    if names:
        return Verdict(
            grpc.StatusCode.PERMISSION_DENIED,
            "peer_not_allowed",
            f"the client certificate ({', '.join(sorted(names))}) is not one of the allowed peers",
        )
    return Verdict(grpc.StatusCode.UNAUTHENTICATED, "missing", "a client certificate is required")


def refuse(security: ServerSecurity, metadata, names: set[str], service: str, method: str):
    """`judge`, with a refusal counted in REJECTED: what every front door
    (the gRPC ports, the HTTP API, the MCP port) asks of a caller."""
    verdict = judge(security, metadata, names)
    if verdict is not None:
        REJECTED.labels(service, method, verdict.code.name, verdict.reason).inc()
    return verdict


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses a call before its handler runs unless its credentials pass
    `judge`. Health is open. It wraps the handler because the peer's
    certificate is only on the call's context."""

    def __init__(self, security: ServerSecurity):
        self._security = security
        # Admits the scheduler's own HTTP front door, which judged its caller
        # already, on the private Unix socket; a fresh secret per process.
        self.local_secret = secrets.token_hex(32)

    def local_metadata(self) -> tuple[tuple[str, str], ...]:
        return ((LOCAL_KEY, self.local_secret),)

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(OPEN_METHOD_PREFIXES):
            return handler
        metadata = handler_call_details.invocation_metadata
        security = self._security
        _, service, name = (method.split("/", 2) + ["", ""])[:3]

        local = self._is_local(metadata)

        async def check(context) -> None:
            if local and context.peer().startswith("unix:"):
                return  # the HTTP front door (see local_secret)
            verdict = refuse(security, metadata, peer_names(context), service, name)
            if verdict is not None:
                log.warning("call refused", method=method, reason=verdict.reason)
                await context.abort(verdict.code, verdict.message)

        return guarded(handler, check)

    def _is_local(self, metadata) -> bool:
        for key, value in metadata or ():
            if key == LOCAL_KEY and isinstance(value, str):
                return hmac.compare_digest(value.encode(), self.local_secret.encode())
        return False


def guarded(handler: grpc.RpcMethodHandler, check) -> grpc.RpcMethodHandler:
    """`handler` with `await check(context)` run first, in all four shapes."""
    des, ser = handler.request_deserializer, handler.response_serializer
    if handler.unary_unary:

        async def unary_unary(request, context):
            await check(context)
            return await handler.unary_unary(request, context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
    if handler.unary_stream:

        async def unary_stream(request, context):
            await check(context)
            async for item in handler.unary_stream(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
    if handler.stream_unary:

        async def stream_unary(requests, context):
            await check(context)
            return await handler.stream_unary(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)

    async def stream_stream(requests, context):
        await check(context)
        async for item in handler.stream_stream(requests, context):
            yield item

    return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)


def server_security_from_args(ns) -> ServerSecurity:
    """The --tls-*, --auth-token-file and --health-port flags as a ServerSecurity."""
    tls = None
    if ns.tls_cert or ns.tls_key or ns.tls_ca:
        if not ns.tls_cert:
            raise SecurityConfigError("--tls-ca needs --tls-cert and --tls-key")
        tls = TlsFiles(ns.tls_cert, ns.tls_key, ns.tls_ca or None)
    return ServerSecurity(
        tls=tls,
        allowed_names=frozenset(n.strip() for n in ns.tls_allowed_names.split(",") if n.strip()),
        tokens=TokenSet(ns.auth_token_file) if ns.auth_token_file else None,
        health_port=ns.health_port,
    )
