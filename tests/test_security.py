"""TLS, mutual TLS and tokens across the three services, with certificates
made at run time (conveyor_common.certs): the public API wants a token over
TLS; the worker and gateway admit only the scheduler (its certificate, or its
own token); health stays open; tokens and certificates rotate without a
restart; the HTTP front door takes the same tokens over HTTPS."""

from __future__ import annotations

import asyncio
import shutil
import ssl
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import structlog
from conveyor.v1 import (
    common_pb2,
    conveyor_pb2,
    conveyor_pb2_grpc,
    llm_worker_pb2,
    llm_worker_pb2_grpc,
)
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from conveyor_common import certs
from conveyor_common.security import (
    ClientSecurity,
    ClientToken,
    SecurityConfigError,
    ServerSecurity,
    TlsFiles,
    TokenSet,
    bearer_token,
    judge,
)
from conveyor_common.server import stop_server

PROGRAM = "```python\nx = 6\nprint(x * 7)\n```\n"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("secrets")
    certs.write_bundle(out)
    # A certificate from the same CA for a peer that is not the scheduler.
    ca, ca_key = (out / "ca.crt").read_bytes(), (out / "ca.key").read_bytes()
    cert, key = certs.make_cert(ca, ca_key, "intruder", ["intruder"])
    (out / "intruder.crt").write_bytes(cert)
    (out / "intruder.key").write_bytes(key)
    return out


def _internal(bundle: Path, service: str) -> ServerSecurity:
    """What the worker and gateway run with in Kubernetes: mutual TLS that
    admits the scheduler by name, or the scheduler's token."""
    return ServerSecurity(
        tls=TlsFiles(
            str(bundle / f"{service}.crt"), str(bundle / f"{service}.key"), str(bundle / "ca.crt")
        ),
        allowed_names=frozenset({"scheduler"}),
        tokens=TokenSet(str(bundle / "internal-tokens")),
    )


@pytest.fixture(scope="module")
async def secure_stack(bundle, tiny_model_dir):
    """(scheduler port, worker port, gateway port, HTTP port, health port)."""
    from llm_worker.config import WorkerConfig
    from llm_worker.engines.hf import build_hf_engine
    from llm_worker.server import create_server as create_worker
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server as create_scheduler
    from scheduler.server import http_port
    from tool_gateway.config import GatewayConfig
    from tool_gateway.server import create_server as create_gateway

    worker_config = WorkerConfig(
        model=str(tiny_model_dir), max_new_tokens=64, security=_internal(bundle, "llm-worker")
    )
    worker, worker_port = await create_worker(worker_config, engine=build_hf_engine(worker_config))
    gateway, gateway_port = await create_gateway(
        GatewayConfig(unit_timeout=20.0, security=_internal(bundle, "tool-gateway")),
        "127.0.0.1",
        0,
    )
    scheduler_config = SchedulerConfig(
        worker_target=f"localhost:{worker_port}",
        gateway_target=f"localhost:{gateway_port}",
        http_port=0,
        security=ServerSecurity(
            tls=TlsFiles(str(bundle / "scheduler.crt"), str(bundle / "scheduler.key")),
            tokens=TokenSet(str(bundle / "api-tokens")),
            health_port=_free_port(),
        ),
        downstream=ClientSecurity(
            tls=TlsFiles(
                str(bundle / "scheduler.crt"), str(bundle / "scheduler.key"), str(bundle / "ca.crt")
            )
        ),
    )
    scheduler, scheduler_port = await create_scheduler(scheduler_config)
    yield (
        scheduler_port,
        worker_port,
        gateway_port,
        http_port(scheduler),
        scheduler_config.security.health_port,
    )
    for server in (scheduler, gateway, worker):
        await stop_server(server, 0)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _api_token(bundle: Path) -> str:
    return (bundle / "api-tokens").read_text().split()[0]


def _tls(bundle: Path, identity: str | None = None) -> grpc.ChannelCredentials:
    return TlsFiles(
        str(bundle / f"{identity}.crt") if identity else None,
        str(bundle / f"{identity}.key") if identity else None,
        str(bundle / "ca.crt"),
    ).channel_credentials()


def _run_request() -> conveyor_pb2.RunRequest:
    return conveyor_pb2.RunRequest(
        messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Compute.")],
        tool_names=["python"],
        forced_completions=[PROGRAM, "It printed 42."],
        max_rounds=2,
    )


def _rejected(code: str, reason: str, service: str = "conveyor.v1.ConveyorService") -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name != "conveyor_auth_rejected":
            continue
        for sample in metric.samples:
            labels = sample.labels
            if (
                sample.name.endswith("_total")
                and labels["grpc_service"] == service
                and labels["grpc_code"] == code
                and labels["reason"] == reason
            ):
                total += sample.value
    return total


async def test_a_run_with_a_token_over_tls_reaches_worker_and_gateway_by_mtls(secure_stack, bundle):
    port = secure_stack[0]
    async with grpc.aio.secure_channel(f"localhost:{port}", _tls(bundle)) as channel:
        stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
        metadata = (("authorization", f"Bearer {_api_token(bundle)}"),)
        events = [e async for e in stub.Run(_run_request(), timeout=60, metadata=metadata)]
    results = [e.unit_result.result for e in events if e.WhichOneof("event") == "unit_result"]
    assert [r.stdout for r in results if r.stdout] == ["42\n"]
    finished = events[-1].run_finished
    assert finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END, finished.message


@pytest.mark.parametrize(
    ("metadata", "reason"),
    [
        ((), "missing"),
        ((("authorization", "Bearer " + "0" * 64),), "invalid"),
        ((("authorization", "Basic dXNlcjpwYXNz"),), "invalid"),
    ],
)
async def test_the_public_api_refuses_a_missing_or_wrong_token(
    secure_stack, bundle, metadata, reason
):
    before = _rejected("UNAUTHENTICATED", reason)
    async with grpc.aio.secure_channel(f"localhost:{secure_stack[0]}", _tls(bundle)) as channel:
        stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListTools(conveyor_pb2.ListToolsRequest(), timeout=10, metadata=metadata)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as refused_stream:
            async for _ in stub.Run(_run_request(), timeout=10, metadata=metadata):
                pass
        assert refused_stream.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert _rejected("UNAUTHENTICATED", reason) == before + 2


async def test_plaintext_to_a_tls_port_gets_no_service(secure_stack):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secure_stack[0]}") as channel:
        stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.ListTools(conveyor_pb2.ListToolsRequest(), timeout=3)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


async def _model_info(port: int, credentials, metadata=()):
    async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
        stub = llm_worker_pb2_grpc.LlmWorkerServiceStub(channel)
        return await stub.GetModelInfo(
            llm_worker_pb2.GetModelInfoRequest(), timeout=5, metadata=metadata
        )


async def test_the_worker_admits_the_scheduler_only(secure_stack, bundle):
    worker_port = secure_stack[1]
    assert (await _model_info(worker_port, _tls(bundle, "scheduler"))).model
    # No client certificate: the handshake itself fails.
    with pytest.raises(grpc.aio.AioRpcError) as no_cert:
        await _model_info(worker_port, _tls(bundle))
    assert no_cert.value.code() == grpc.StatusCode.UNAVAILABLE
    # A certificate the CA signed, for someone else.
    before = _rejected("PERMISSION_DENIED", "peer_not_allowed", "conveyor.v1.LlmWorkerService")
    with pytest.raises(grpc.aio.AioRpcError) as intruder:
        await _model_info(worker_port, _tls(bundle, "intruder"))
    assert intruder.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "intruder" in intruder.value.details()
    after = _rejected("PERMISSION_DENIED", "peer_not_allowed", "conveyor.v1.LlmWorkerService")
    assert after == before + 1
    # ... who also holds the scheduler's token: the token admits it.
    token = (bundle / "scheduler-token").read_text().strip()
    info = await _model_info(
        worker_port, _tls(bundle, "intruder"), (("authorization", f"Bearer {token}"),)
    )
    assert info.model


async def test_health_needs_no_credentials(secure_stack, bundle):
    scheduler_port, _, gateway_port, _, health_port = secure_stack
    for port in (scheduler_port,):
        async with grpc.aio.secure_channel(f"localhost:{port}", _tls(bundle)) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
    # The plaintext probe port serves health and nothing else.
    async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="conveyor.v1.ConveyorService"), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as other:
            await conveyor_pb2_grpc.ConveyorServiceStub(channel).ListTools(
                conveyor_pb2.ListToolsRequest(), timeout=5
            )
        assert other.value.code() == grpc.StatusCode.UNIMPLEMENTED


async def test_a_rotated_token_file_takes_effect_without_a_restart(secure_stack, bundle):
    path = bundle / "api-tokens"
    old, new = _api_token(bundle), certs.new_token()
    async with grpc.aio.secure_channel(f"localhost:{secure_stack[0]}", _tls(bundle)) as channel:
        stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)

        async def works(token: str) -> bool:
            try:
                await stub.ListTools(
                    conveyor_pb2.ListToolsRequest(),
                    timeout=10,
                    metadata=(("authorization", f"Bearer {token}"),),
                )
            except grpc.aio.AioRpcError as e:
                assert e.code() == grpc.StatusCode.UNAUTHENTICATED
                return False
            return True

        try:
            assert await works(old) and not await works(new)
            path.write_text(f"# rotated\n{new}\n{old}\n")  # both, during the switch
            await asyncio.sleep(2.1)
            assert await works(new) and await works(old)
            path.write_text(f"{new}\n")  # the old one retired
            await asyncio.sleep(2.1)
            assert await works(new) and not await works(old)
            path.write_text("short\n")  # a bad rewrite keeps the last good tokens
            await asyncio.sleep(2.1)
            assert await works(new)
        finally:
            path.write_text(f"{old}\n")
            await asyncio.sleep(2.1)


async def test_a_renewed_server_certificate_is_served_to_new_connections(
    bundle, tmp_path, tiny_model_dir
):
    """The gateway's certificate is swapped for one from another CA: a new
    connection that trusts only the new CA gets through."""
    from tool_gateway.config import GatewayConfig
    from tool_gateway.server import create_server

    first = tmp_path / "first"
    second = tmp_path / "second"
    certs.write_bundle(first)
    certs.write_bundle(second)
    live = tmp_path / "live"
    live.mkdir()
    for name in ("tool-gateway.crt", "tool-gateway.key"):
        shutil.copy(first / name, live / name)
    security = ServerSecurity(
        tls=TlsFiles(str(live / "tool-gateway.crt"), str(live / "tool-gateway.key"))
    )
    server, port = await create_server(GatewayConfig(security=security), "127.0.0.1", 0)

    async def serving(ca: Path) -> bool:
        credentials = grpc.ssl_channel_credentials(root_certificates=ca.read_bytes())
        async with grpc.aio.secure_channel(f"localhost:{port}", credentials) as channel:
            try:
                await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=3
                )
            except grpc.aio.AioRpcError:
                return False
            return True

    try:
        assert await serving(first / "ca.crt") and not await serving(second / "ca.crt")
        for name in ("tool-gateway.crt", "tool-gateway.key"):
            shutil.copy(second / name, live / name)
        await asyncio.sleep(2.1)
        assert await serving(second / "ca.crt") and not await serving(first / "ca.crt")
    finally:
        await stop_server(server, 0)


async def test_the_http_front_door_takes_the_same_tokens_over_https(secure_stack, bundle):
    http = secure_stack[3]
    base = f"https://localhost:{http}"
    verify = ssl.create_default_context(cafile=str(bundle / "ca.crt"))
    async with httpx.AsyncClient(verify=verify) as h:
        assert (await h.get(f"{base}/health")).status_code == 200
        refused = await h.get(f"{base}/v1/models")
        assert refused.status_code == 401
        assert refused.headers["WWW-Authenticate"].startswith("Bearer")
        assert refused.json()["error"]["code"] == "invalid_api_key"
        wrong = await h.get(f"{base}/v1/models", headers={"Authorization": "Bearer " + "1" * 40})
        assert wrong.status_code == 401
    async with openai.AsyncOpenAI(
        base_url=f"{base}/v1",
        api_key=_api_token(bundle),
        http_client=httpx.AsyncClient(verify=verify),
    ) as client:
        model = (await client.models.list()).data[0].id
        reply = await client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "Compute."}],
            tools=[{"type": "function", "function": {"name": "python"}}],
            extra_body={
                "conveyor": {"forced_completions": [PROGRAM, "It printed 42."], "max_rounds": 2}
            },
        )
    assert reply.choices[0].message.content.endswith("It printed 42.")


def test_judge_admits_a_named_peer_or_a_token(bundle):
    security = _internal(bundle, "llm-worker")
    token = (bundle / "scheduler-token").read_text().strip()
    bearer = (("authorization", f"Bearer {token}"),)
    assert judge(security, (), {"scheduler"}) is None
    assert judge(security, bearer, {"intruder"}) is None
    assert judge(security, (), {"intruder"}).code == grpc.StatusCode.PERMISSION_DENIED
    tokens_only = ServerSecurity(tokens=security.tokens)
    assert judge(tokens_only, bearer, set()) is None
    assert judge(tokens_only, (), set()).reason == "missing"
    assert judge(tokens_only, (("authorization", "Bearer nope"),), set()).reason == "invalid"


def test_bearer_token_parsing():
    assert bearer_token((("authorization", "Bearer abc"),)) == "abc"
    assert bearer_token((("authorization", "bearer  abc "),)) == "abc"
    assert bearer_token((("authorization", "Basic abc"),)) == ""
    assert bearer_token((("x-other", "Bearer abc"),)) is None
    assert bearer_token(None) is None


def test_token_files_are_checked(tmp_path):
    path = tmp_path / "tokens"
    path.write_text("# comment\n\n" + "a" * 32 + "\n" + "b" * 32 + "\n")
    tokens = TokenSet(str(path))
    assert tokens.accepts("a" * 32) and tokens.accepts("b" * 32)
    assert not tokens.accepts("a" * 31) and not tokens.accepts("")
    path.write_text("password\n")
    with pytest.raises(SecurityConfigError, match="at least 16"):
        TokenSet(str(path))
    path.write_text("")
    assert not TokenSet(str(path)).accepts("a" * 32)  # empty: no one
    with pytest.raises(SecurityConfigError, match="holds no token"):
        ClientToken(str(path))
    with pytest.raises(SecurityConfigError, match="cannot read"):
        TokenSet(str(tmp_path / "missing"))


def test_tls_settings_are_checked(bundle):
    with pytest.raises(SecurityConfigError, match="needs its key"):
        TlsFiles(str(bundle / "scheduler.crt"))
    with pytest.raises(SecurityConfigError, match="cannot read"):
        TlsFiles(str(bundle / "nope.crt"), str(bundle / "nope.key"))
    with pytest.raises(SecurityConfigError, match="needs --tls-ca"):
        ServerSecurity(
            tls=TlsFiles(str(bundle / "scheduler.crt"), str(bundle / "scheduler.key")),
            allowed_names=frozenset({"scheduler"}),
        )


def test_flags_make_the_security(bundle):
    from scheduler.config import SchedulerConfig
    from scheduler.config import build_parser as scheduler_flags
    from tool_gateway.config import GatewayConfig
    from tool_gateway.config import build_parser as gateway_flags

    args = gateway_flags().parse_args(
        [
            "--tls-cert",
            str(bundle / "tool-gateway.crt"),
            "--tls-key",
            str(bundle / "tool-gateway.key"),
            "--tls-ca",
            str(bundle / "ca.crt"),
            "--tls-allowed-names",
            "scheduler",
            "--auth-token-file",
            str(bundle / "internal-tokens"),
            "--health-port",
            "8081",
        ]
    )
    security = GatewayConfig.from_args(args).security
    assert security.tls.ca and security.allowed_names == {"scheduler"}
    assert security.tokens and security.health_port == 8081
    args = scheduler_flags().parse_args(
        [
            "--tls-cert",
            str(bundle / "scheduler.crt"),
            "--tls-key",
            str(bundle / "scheduler.key"),
            "--downstream-tls-ca",
            str(bundle / "ca.crt"),
            "--downstream-token-file",
            str(bundle / "scheduler-token"),
        ]
    )
    config = SchedulerConfig.from_args(args)
    # The scheduler presents its own certificate downstream unless told otherwise.
    assert config.downstream.tls.cert == str(bundle / "scheduler.crt")
    assert config.downstream.metadata()[0][1].startswith("Bearer ")
    assert config.security.tls.ca is None  # public callers need no certificate


async def test_listening_beyond_loopback_in_the_clear_warns():
    from conveyor_common.server import add_standard_services, bind, new_server

    server = new_server()
    add_standard_services(server, ["x.Y"])
    with structlog.testing.capture_logs() as logs:
        bind(server, "0.0.0.0", 0)
        bind(server, "127.0.0.1", 0)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 2  # no TLS, no authentication; loopback says nothing
    assert "without TLS" in warnings[0]["event"]
    assert "no authentication" in warnings[1]["event"]
    await server.stop(0)


async def test_the_cli_connects_with_tls_and_a_token(secure_stack, bundle):
    import os
    import sys

    async def cli(*args: str, token: str | None) -> tuple[int, str, str]:
        env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_TOKEN"}
        if token is not None:
            env["CONVEYOR_TOKEN"] = token
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "conveyor_common.cli",
            "tools",
            "--target",
            f"localhost:{secure_stack[0]}",
            "--tls-ca",
            str(bundle / "ca.crt"),
            *args,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), 60)
        return process.returncode, out.decode(), err.decode()

    code, out, _ = await cli("--token-file", str(bundle / "api-tokens"), token=None)
    assert code == 0 and "python" in out
    code, out, _ = await cli(token=_api_token(bundle))
    assert code == 0 and "python" in out
    code, _, err = await cli(token=None)
    assert code == 2 and "UNAUTHENTICATED" in err


def test_renewed_certificates_come_from_the_same_ca_and_keep_the_tokens(tmp_path):
    from cryptography import x509

    certs.write_bundle(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    certs.write_bundle(tmp_path, renew=True)
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for same in ("ca.crt", "ca.key", "api-tokens", "scheduler-token", "internal-tokens"):
        assert after[same] == before[same]
    assert after["llm-worker.crt"] != before["llm-worker.crt"]
    ca = x509.load_pem_x509_certificate(after["ca.crt"])
    renewed = x509.load_pem_x509_certificate(after["llm-worker.crt"])
    renewed.verify_directly_issued_by(ca)


async def test_the_http_front_door_takes_a_renewed_certificate(bundle, tmp_path, worker, gateway):
    """The door's certificate swapped for one from another CA: a client that
    trusts only the new CA gets through once the files have settled."""
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server, http_port

    first, second, live = tmp_path / "a", tmp_path / "b", tmp_path / "live"
    certs.write_bundle(first)
    certs.write_bundle(second)
    live.mkdir()
    for name in ("scheduler.crt", "scheduler.key"):
        shutil.copy(first / name, live / name)
    _, worker_target = worker
    config = SchedulerConfig(
        worker_target=worker_target,
        gateway_target=gateway,
        http_port=0,
        security=ServerSecurity(
            tls=TlsFiles(str(live / "scheduler.crt"), str(live / "scheduler.key"))
        ),
    )
    server, _ = await create_server(config)
    url = f"https://localhost:{http_port(server)}/health"

    async def trusted_by(ca: Path) -> bool:
        verify = ssl.create_default_context(cafile=str(ca))
        async with httpx.AsyncClient(verify=verify) as h:
            try:
                return (await h.get(url)).status_code == 200
            except httpx.ConnectError:
                return False

    try:
        assert await trusted_by(first / "ca.crt") and not await trusted_by(second / "ca.crt")
        for name in ("scheduler.crt", "scheduler.key"):
            shutil.copy(second / name, live / name)
        for _ in range(40):
            if await trusted_by(second / "ca.crt"):
                break
            await asyncio.sleep(0.25)
        assert await trusted_by(second / "ca.crt") and not await trusted_by(first / "ca.crt")
    finally:
        await stop_server(server, 0)


async def test_a_unix_socket_caller_is_not_trusted_without_the_local_secret(tmp_path):
    """Only the front door, holding its server's secret, skips the token on
    the private socket; anyone else there is judged like any caller."""
    from conveyor_common.server import bind, extras
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server

    path = tmp_path / "tokens"
    path.write_text(certs.new_token() + "\n")
    config = SchedulerConfig(
        worker_target="127.0.0.1:1",
        gateway_target="127.0.0.1:1",
        connect_timeout=0.5,
        http_port=0,
        security=ServerSecurity(tokens=TokenSet(str(path))),
    )
    server, _ = await create_server(config)
    try:
        async with grpc.aio.insecure_channel(extras(server).socket) as channel:
            stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.ListTools(
                    conveyor_pb2.ListToolsRequest(),
                    timeout=5,
                    metadata=(("x-conveyor-local", "0" * 64),),
                )
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(ValueError, match="TCP"):
            bind(server, "unix:/tmp/x.sock", 0)
    finally:
        await stop_server(server, 0)
