"""The playground (/ui) end to end in headless Chromium (Debian's chromium,
driven by playwright-core from tests/ui): a forced run in partial mode whose
timeline shows tool units overlapping decoding, then a rerun of the same
output in sequential mode beside it; a screenshot check of the overlap."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import httpx
import pytest

from tests.test_openai_http import ANSWER, PROGRAM, http_url  # noqa: F401 (fixture)

UI = Path(__file__).with_name("ui")
DECODE, UNIT = (0x4A, 0x78, 0xC2), (0xE0, 0x8A, 0x1E)  # the page's bar colours


def _need_browser() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium or not (UI / "node_modules" / "playwright-core").is_dir():
        pytest.fail("needs chromium and tests/ui/node_modules: run `make install`")
    return chromium


async def test_the_page_and_its_tools_endpoint_are_served(http_url):  # noqa: F811
    async with httpx.AsyncClient() as h:
        page = await h.get(f"{http_url}/ui")
        tools = (await h.get(f"{http_url}/v1/conveyor/tools")).json()["tools"]
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="rerun"' in page.text and "/v1/chat/completions" in page.text
    assert "python" in [t["name"] for t in tools]


def _columns_with_both(png: Path) -> int:
    """Pixel columns where a unit bar and a decode bar are both drawn."""
    from PIL import Image

    image = Image.open(png).convert("RGB")
    width, height = image.size
    pixels = image.load()

    def near(p, c):
        return all(abs(a - b) <= 12 for a, b in zip(p, c, strict=True))

    both = 0
    for x in range(width):
        column = [pixels[x, y] for y in range(height)]
        both += any(near(p, DECODE) for p in column) and any(near(p, UNIT) for p in column)
    return both


@pytest.fixture(scope="module")
async def token_url(worker, gateway, tmp_path_factory):
    """(URL, token) of an HTTP front door that takes tokens."""
    from conveyor_common import certs
    from conveyor_common.security import ServerSecurity, TokenSet
    from conveyor_common.server import stop_server
    from scheduler.config import SchedulerConfig
    from scheduler.server import create_server, http_port

    token = certs.new_token()
    path = tmp_path_factory.mktemp("tokens") / "api-tokens"
    path.write_text(token + "\n")
    _, worker_target = worker
    config = SchedulerConfig(
        worker_target=worker_target,
        gateway_target=gateway,
        http_port=0,
        security=ServerSecurity(tokens=TokenSet(str(path))),
    )
    server, _ = await create_server(config)
    yield f"http://127.0.0.1:{http_port(server)}", token
    await stop_server(server, 0)


async def test_the_timeline_shows_units_under_decoding_and_the_rerun_beside_it(
    http_url,  # noqa: F811
    tmp_path,
):
    await _drive_the_page(http_url, tmp_path)


async def test_behind_tokens_the_page_works_once_the_token_is_typed(token_url, tmp_path):
    url, token = token_url
    seen = await _drive_the_page(url, tmp_path, token)
    assert "401" in seen["refused"] and "invalid_api_key" in seen["refused"]


async def _drive_the_page(base: str, tmp_path: Path, token: str | None = None) -> dict:
    import os

    chromium = _need_browser()
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(UI / "playground.mjs"),
        base,
        json.dumps([PROGRAM, ANSWER]),
        str(tmp_path),
        *([token] if token else []),
        env={**os.environ, "CHROMIUM": chromium},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    assert proc.returncode == 0, err.decode()[-3000:]
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert seen["errors"] == [] and seen["tools"] >= 1
    sequential, partial = seen["runs"]  # newest first
    assert (partial["mode"], sequential["mode"]) == ("partial", "sequential")
    # The rerun forced the same output.
    assert partial["text"] == sequential["text"] and "print(x * 7)" in partial["text"]
    assert partial["units"] == sequential["units"] == 4
    assert partial["overlapping"] >= 2, partial  # dispatched while the model wrote on
    assert "hidden under decoding" in partial["summary"]
    assert _columns_with_both(tmp_path / "partial.png") > 0
    assert (tmp_path / "both.png").stat().st_size > 10_000
    return seen
