"""docker-compose.yml against the code: every command parses with its
service's own flags, ports agree with conveyor_common.defaults and with the
health checks, the scheduler dials the other two services by their compose
names, and every build target and health-check module exists.

No Docker engine is needed: the file is read, not run.
"""

from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import sys
from pathlib import Path

import pytest
import yaml

from conveyor_common import defaults, healthcheck

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_FILE = ROOT / "docker-compose.yml"

# compose service name -> (package run with `python -m`, gRPC port, metrics port)
SERVICES = {
    "llm-worker": ("llm_worker", defaults.WORKER_PORT, defaults.WORKER_METRICS_PORT),
    "tool-gateway": ("tool_gateway", defaults.GATEWAY_PORT, defaults.GATEWAY_METRICS_PORT),
    "scheduler": ("scheduler", defaults.SCHEDULER_PORT, defaults.SCHEDULER_METRICS_PORT),
}
HEALTH_PORTS = {
    "llm-worker": defaults.WORKER_HEALTH_PORT,
    "tool-gateway": defaults.GATEWAY_HEALTH_PORT,
    "scheduler": defaults.SCHEDULER_HEALTH_PORT,
}
SECRETS_DIR = "/run/secrets"

_VARIABLE = re.compile(r"\$\$|\$\{(?P<name>\w+)(?::?[-?](?P<default>[^}]*))?\}|\$(?P<bare>\w+)")


def interpolate(text: str) -> str:
    """Compose's variable interpolation with every variable unset, so the test
    checks the defaults the file ships with, whatever the environment."""

    def replace(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        return match.group("default") or ""

    return _VARIABLE.sub(replace, text)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def argv_of(value) -> list[str]:
    """A command in either compose form (list, or a string split like a shell)."""
    items = shlex.split(value) if isinstance(value, str) else [str(v) for v in value]
    return [interpolate(item) for item in items]


def parse_command(compose: dict, name: str):
    package = SERVICES[name][0]
    argv = argv_of(compose["services"][name]["command"])
    assert argv[:3] == ["python", "-m", package], f"{name} should run `python -m {package}`"
    try:
        config = importlib.import_module(f"{package}.config")
    except ModuleNotFoundError as err:
        pytest.fail(f"{name} runs `python -m {package}`, but {package}.config: {err}")
    parser = config.build_parser()
    try:
        return parser.parse_args(argv[3:])
    except SystemExit:
        pytest.fail(f"{name}'s command does not parse with {package}.config: {argv[3:]}")


def healthcheck_argv(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    if isinstance(test, str):
        return argv_of(test)
    kind, *rest = test
    if kind == "CMD":
        return argv_of(rest)
    if kind == "CMD-SHELL":
        return argv_of(rest[0])
    raise AssertionError(f"unexpected healthcheck form {test!r}")


def container_ports(service: dict) -> set[int]:
    """Container-side ports from `expose` and from `ports` in short or long form."""
    ports: set[int] = set()
    for entry in service.get("expose", []):
        ports.add(int(str(entry).split("/")[0]))
    for entry in service.get("ports", []):
        if isinstance(entry, dict):
            ports.add(int(entry["target"]))
        else:
            ports.add(int(str(entry).split("/")[0].rsplit(":", 1)[-1]))
    return ports


def dockerfile_targets(path: Path) -> set[str]:
    pattern = re.compile(
        r"^\s*FROM\s+(?:--\S+\s+)*\S+\s+AS\s+(\S+)\s*$", re.IGNORECASE | re.MULTILINE
    )
    return set(pattern.findall(path.read_text()))


def test_the_three_services_and_nothing_else(compose):
    assert set(compose["services"]) == set(SERVICES)


@pytest.mark.parametrize("name", SERVICES)
def test_command_parses_with_the_service_flags_and_default_ports(compose, name):
    _, port, metrics_port = SERVICES[name]
    args = parse_command(compose, name)
    assert args.port == port, f"{name} --port differs from conveyor_common.defaults"
    assert args.metrics_port == metrics_port, f"{name} --metrics-port differs from defaults"
    assert args.host == "0.0.0.0", f"{name} must listen on every interface of its container"


@pytest.mark.parametrize("name", SERVICES)
def test_python_m_package_is_runnable(compose, name):
    package = SERVICES[name][0]
    assert importlib.util.find_spec(f"{package}.__main__") is not None, (
        f"`python -m {package}` needs {package}/__main__.py"
    )


@pytest.mark.parametrize("name", SERVICES)
def test_healthcheck_calls_grpc_health_on_the_health_port(compose, name):
    service = compose["services"][name]
    args = parse_command(compose, name)
    argv = healthcheck_argv(service)
    assert argv[:2] == ["python", "-m"], f"{name}'s healthcheck should run a Python module"
    module = argv[2]
    assert importlib.util.find_spec(module) is not None, f"healthcheck module {module} is missing"
    assert module == "conveyor_common.healthcheck"
    check = healthcheck.build_parser().parse_args(argv[3:])
    # The service port is TLS with client authentication; the check speaks
    # plaintext to the health-only port.
    assert args.health_port == HEALTH_PORTS[name]
    assert check.port == args.health_port, f"{name}'s healthcheck probes another port"
    assert check.host in ("127.0.0.1", "localhost")


@pytest.mark.parametrize("name", SERVICES)
def test_ports_match_the_command(compose, name):
    args = parse_command(compose, name)
    ports = container_ports(compose["services"][name])
    assert args.port in ports, f"{name} serves {args.port} but exposes/publishes {ports}"
    assert args.metrics_port in ports, f"{name}'s metrics port {args.metrics_port} is not exposed"


def test_only_the_scheduler_is_published_to_the_host(compose):
    services = compose["services"]
    assert defaults.SCHEDULER_PORT in container_ports({"ports": services["scheduler"]["ports"]})
    for name in ("llm-worker", "tool-gateway"):
        # A fixed host port would also make `--scale` fail on the second replica.
        assert not services[name].get("ports"), f"{name} should only be exposed internally"


def test_scheduler_dials_the_other_services_by_compose_name(compose):
    args = parse_command(compose, "scheduler")
    for attr, name in (("worker_target", "llm-worker"), ("gateway_target", "tool-gateway")):
        target = getattr(args, attr)
        # dns:/// so every replica's address is resolved and round-robin spreads calls.
        assert target.startswith("dns:///"), f"--{attr.replace('_', '-')} should dial dns:///"
        host, _, port = target.removeprefix("dns:///").rpartition(":")
        assert host == name, f"--{attr.replace('_', '-')} names {host!r}, not the {name} service"
        assert int(port) == parse_command(compose, name).port


def test_scheduler_waits_for_healthy_dependencies(compose):
    depends = compose["services"]["scheduler"]["depends_on"]
    for name in ("llm-worker", "tool-gateway"):
        assert depends[name]["condition"] == "service_healthy"


@pytest.mark.parametrize("name", SERVICES)
def test_build_target_exists_in_the_dockerfile(compose, name):
    build = compose["services"][name]["build"]
    dockerfile = ROOT / build.get("context", ".") / build.get("dockerfile", "Dockerfile")
    assert dockerfile.is_file(), f"{dockerfile} is missing"
    target = interpolate(build["target"])
    assert target in dockerfile_targets(dockerfile), (
        f"{dockerfile.name} has no stage {target!r} for {name}"
    )


def test_worker_cache_dir_is_a_named_volume(compose):
    args = parse_command(compose, "llm-worker")
    mounts = compose["services"]["llm-worker"].get("volumes", [])
    named = {str(m).split(":")[0]: str(m).split(":")[1] for m in mounts if isinstance(m, str)}
    assert args.cache_dir in named.values(), f"--cache-dir {args.cache_dir} is not on a volume"
    volume = next(src for src, dst in named.items() if dst == args.cache_dir)
    assert volume in (compose.get("volumes") or {}), f"{volume} is not a declared named volume"


def test_replicas_start_at_one_for_the_scalable_services(compose):
    for name in ("llm-worker", "tool-gateway"):
        service = compose["services"][name]
        assert service["deploy"]["replicas"] == 1
        assert "container_name" not in service, f"container_name would stop {name} from scaling"


def test_interpolation_uses_defaults():
    assert interpolate("${A:-x}") == "x"
    assert interpolate("${A-y}z") == "yz"
    assert interpolate("${A}") == ""
    assert interpolate("$$HOME") == "$HOME"


def test_the_vllm_worker_target_exists_and_compose_can_pick_it(compose):
    """CONVEYOR_WORKER_TARGET=llm-worker-vllm builds the worker with vLLM in
    it; CONVEYOR_ENGINE chooses the engine on the same command line."""
    build = compose["services"]["llm-worker"]["build"]
    assert "CONVEYOR_WORKER_TARGET" in build["target"]
    assert "llm-worker-vllm" in dockerfile_targets(ROOT / "docker" / "Dockerfile")
    args = parse_command(compose, "llm-worker")
    assert args.engine == "hf" and args.engine_url == ""


def _secret_paths(args) -> list[str]:
    names = ("tls_cert", "tls_key", "tls_ca", "auth_token_file")
    names += ("downstream_tls_ca", "downstream_tls_cert", "downstream_tls_key")
    names += ("downstream_token_file",)
    return [getattr(args, n) for n in names if getattr(args, n, "")]


@pytest.mark.parametrize("name", SERVICES)
def test_certificates_and_tokens_come_from_compose_secrets(compose, name, tmp_path):
    """Every file a command names lies in /run/secrets, comes from a secret
    the service mounts, and `make secrets` writes its source."""
    from conveyor_common import certs

    args = parse_command(compose, name)
    assert args.tls_cert and args.tls_key, f"{name} serves TLS"
    mounted = set(compose["services"][name]["secrets"])
    declared = compose["secrets"]
    certs.write_bundle(tmp_path, readable_keys=True)
    for path in _secret_paths(args):
        directory, _, secret = path.rpartition("/")
        assert directory == SECRETS_DIR and secret in mounted, f"{name}: {path}"
        source = Path(declared[secret]["file"])
        assert source.parent == Path(".secrets"), f"{secret} should come from .secrets/"
        assert (tmp_path / source.name).is_file(), f"make secrets writes no {source.name}"
    if name == "scheduler":
        assert args.auth_token_file and args.downstream_tls_ca
    else:
        assert args.tls_ca and args.tls_allowed_names == "scheduler"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _local_argv(argv: list[str], secrets: Path, ports: dict[int, int], model: str) -> list[str]:
    """A compose command as a process here: secrets from `secrets`, the
    compose names as localhost, each port moved to a free one."""
    out = []
    for item in argv:
        item = item.replace(SECRETS_DIR, str(secrets))
        for service in SERVICES:
            item = item.replace(f"dns:///{service}:", "dns:///localhost:")
        for old, new in ports.items():
            item = item.replace(f":{old}", f":{new}")
            if item == str(old):
                item = str(new)
        out.append(item)
    if out[2] == "llm_worker":
        out[out.index("--model") + 1] = model
        out[out.index("--cache-dir") + 1] = str(secrets.parent / "cache")
    return [sys.executable, *out[1:]]


async def test_the_compose_commands_serve_a_run_over_tls_with_tokens(
    compose, tmp_path, tiny_model_dir
):
    """The three commands exactly as compose runs them (paths and ports
    moved), as processes: healthy on their health ports, and a run with the
    API token over TLS reaches the worker and gateway by mutual TLS."""
    import asyncio
    import os
    import signal

    import grpc
    from conveyor.v1 import common_pb2, conveyor_pb2, conveyor_pb2_grpc

    from conveyor_common import certs
    from conveyor_common.healthcheck import check
    from conveyor_common.security import TlsFiles

    secrets = tmp_path / "secrets"
    certs.write_bundle(secrets, readable_keys=True)
    ports = {}
    for name in SERVICES:
        args = parse_command(compose, name)
        for port in (args.port, args.metrics_port, args.health_port):
            ports[port] = _free_port()
    ports[8080] = _free_port()
    env = {**os.environ, "LOG_FORMAT": "json", "CONVEYOR_ENGINE_API_KEY": ""}
    processes = {}
    try:
        for name in ("llm-worker", "tool-gateway", "scheduler"):
            argv = argv_of(compose["services"][name]["command"])
            processes[name] = await asyncio.create_subprocess_exec(
                *_local_argv(argv, secrets, ports, str(tiny_model_dir)),
                env=env,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        for name, health in HEALTH_PORTS.items():
            for _ in range(240):
                if processes[name].returncode is not None:
                    err = (await processes[name].stderr.read()).decode()[-2000:]
                    pytest.fail(f"{name} exited: {err}")
                if (await asyncio.to_thread(check, ports[health], timeout=1.0)).serving:
                    break
                await asyncio.sleep(0.5)
            else:
                pytest.fail(f"{name} never became healthy")
        credentials = TlsFiles(ca=str(secrets / "ca.crt")).channel_credentials()
        target = f"localhost:{ports[defaults.SCHEDULER_PORT]}"
        token = (secrets / "api-tokens").read_text().strip()
        async with grpc.aio.secure_channel(target, credentials) as channel:
            stub = conveyor_pb2_grpc.ConveyorServiceStub(channel)
            request = conveyor_pb2.RunRequest(
                messages=[common_pb2.ChatMessage(role=common_pb2.ROLE_USER, content="Go.")],
                tool_names=["python"],
                forced_completions=["```python\nprint(6 * 7)\n```\n", "Done."],
                max_rounds=2,
            )
            events = [
                e
                async for e in stub.Run(
                    request, timeout=120, metadata=(("authorization", f"Bearer {token}"),)
                )
            ]
        outputs = [e.unit_result.result.stdout for e in events if e.HasField("unit_result")]
        assert "42\n" in outputs
        assert events[-1].run_finished.finish_reason == common_pb2.FINISH_REASON_FORCED_END
    finally:
        for process in processes.values():
            if process.returncode is None:
                process.send_signal(signal.SIGTERM)
        for process in processes.values():
            try:
                await asyncio.wait_for(process.wait(), 20)
            except TimeoutError:
                process.kill()
