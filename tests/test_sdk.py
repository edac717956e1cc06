"""The Python SDK (sdk/python, `conveyor-client`) as a user gets it: a wheel
built by pip that carries its own stubs, installed apart from the project,
driving the in-process stack (async and sync runs, list_tools, cancel by
leaving the loop, errors by status)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

USER_CODE = r"""
import asyncio, sys
import conveyor_client
from conveyor_client import Client, SyncClient, events

assert conveyor_client.__file__.startswith(sys.argv[2]), conveyor_client.__file__
target = sys.argv[1]


async def main():
    async with Client(target, token="t0ken", timeout=60) as client:
        tools = await client.list_tools()
        print("tools", sorted(t.name for t in tools))
        kinds = []
        run = client.run("Hi", max_new_tokens=6, max_rounds=1, temperature=0.5, seed=1)
        async for event in run:
            kinds.append(type(event).__name__)
        assert kinds[-1] == "Finished" and "Token" in kinds, kinds
        print("async run", kinds[-1])
        try:
            async for _ in client.run("Hi", max_rounds=99):
                pass
        except conveyor_client.InvalidRequest as e:
            print("invalid", e.code.name)
    async with Client("127.0.0.1:1", timeout=5) as nowhere:
        try:
            await nowhere.list_tools(timeout=2)
        except (conveyor_client.Unavailable, conveyor_client.DeadlineExceeded) as e:
            print("unreachable", type(e).__name__)


asyncio.run(main())
with SyncClient(target, timeout=60) as client:
    seen = []
    for event in client.run("Talk", max_new_tokens=400, max_rounds=1):
        seen.append(event)
        if len(seen) == 3:
            break  # leaving the loop cancels the run
    assert all(isinstance(e, (events.RoundStarted, events.Token)) for e in seen), seen
    print("sync run stopped after", len(seen))
    print("sync tools", len(client.list_tools()))
"""


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The SDK wheel, built by pip and installed into a folder of its own."""
    out = tmp_path_factory.mktemp("sdk")
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(out / "dist"), "sdk/python"],
        cwd=ROOT,
        check=True,
    )
    (wheel,) = (out / "dist").glob("conveyor_client-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "conveyor_client/_proto/v1/conveyor_pb2.py" in names
    assert "conveyor_client/py.typed" in names
    assert not any("tool_gateway" in n or n.startswith("conveyor/") for n in names), names
    target = out / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


async def test_the_sdk_drives_a_run_from_its_own_wheel(installed, scheduler, worker):
    engine, _ = worker
    # Only the SDK's folder on the path: not the repository, not gen/.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(installed)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        USER_CODE,
        scheduler,
        str(installed),
        cwd="/",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0, err.decode()[-3000:]
    lines = out.decode().splitlines()
    assert lines[0].startswith("tools [") and "'python'" in lines[0]
    assert "async run Finished" in lines and "invalid INVALID_ARGUMENT" in lines
    assert any(line.startswith("unreachable ") for line in lines)
    assert "sync run stopped after 3" in lines and lines[-1].startswith("sync tools ")
    for _ in range(100):  # the abandoned sync run was cancelled on the worker
        if engine.running == 0:
            break
        await asyncio.sleep(0.05)
    assert engine.running == 0
