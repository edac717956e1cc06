"""`--engine openai --engine-url URL`: any OpenAI-compatible server (vLLM,
SGLang, llama.cpp's server, TGI) behind the worker's stream.

The worker renders the prompt with the model's own tokenizer and chat
template (`--model` names the same model the server runs) and sends the
token ids to `/v1/completions`, so the model sees what it would in process.
Servers that return token ids (vLLM's `return_token_ids`) get exact parity
with the other engines; for the others the streamed text is re-tokenized.
Aborting closes the stream, which the server takes as a cancel.

Everything the server sends is hostile input: lines are bounded, chunks are
shape-checked, ids checked against the vocabulary, and a bad stream fails
only its request (ERROR), while a server that cannot be reached gives
UNAVAILABLE. Forced decoding needs a vLLM server started with
`--logits-processors llm_worker.engines.vllm_forced:ForcedTokens`; other
servers ignore the request for it, and the request then ends with ERROR."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx
import structlog

from conveyor_common.types import FinishReason
from llm_worker.config import WorkerConfig
from llm_worker.engines.base import (
    EngineInfo,
    EngineUnavailable,
    GenerationRequest,
    RequestError,
)
from llm_worker.engines.output import TokenRules
from llm_worker.engines.prepare import Tokenized
from llm_worker.engines.relay import RelayEngine, TokenChunk
from llm_worker.model_cache import resolve
from llm_worker.tool_format import choose_tool_format

log = structlog.get_logger("engine")

FORCED_KEY = "conveyor_forced"  # as vllm_forced.FORCED_KEY (not importable without vLLM)
MAX_LINE_BYTES = 1 << 20  # one SSE line; a token chunk is a few hundred bytes
_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORTED}


class BadStream(Exception):
    """The server sent something that is not a completion stream."""


def base_url(url: str) -> str:
    """ "http://host:8000", "http://host:8000/" or "http://host:8000/v1"."""
    url = url.rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"--engine-url must be an http:// or https:// URL, not {url!r}")
    return url.removesuffix("/v1")


class OpenAIEngine(RelayEngine):
    def __init__(
        self,
        client: httpx.AsyncClient,
        tokenizer,
        *,
        label: str,
        url: str,
        served_model: str,
        max_context: int,
        tool_call_format: str,
        default_max_new_tokens: int,
    ) -> None:
        super().__init__()
        self._client = client
        self.tokenizer = tokenizer
        self.max_context = max_context
        self.default_max_new_tokens = default_max_new_tokens
        self.rules = TokenRules.of(tokenizer, tool_call_format)
        self._served = served_model
        self._vocab = len(tokenizer)
        self._info = EngineInfo(
            model=label,
            device=url,
            dtype="",
            max_context=max_context,
            tool_call_format=tool_call_format,
            engine="openai",
        )

    @classmethod
    async def open(cls, config: WorkerConfig) -> OpenAIEngine:
        """Connects (waiting, with the worker NOT_SERVING, while the server
        starts) and learns the served model's name and context length."""
        from transformers import AutoConfig, AutoTokenizer

        url = base_url(config.engine_url)
        headers = (
            {"Authorization": f"Bearer {config.engine_api_key}"} if config.engine_api_key else {}
        )
        client = httpx.AsyncClient(
            base_url=url,
            headers=headers,
            timeout=httpx.Timeout(
                config.engine_read_timeout, connect=config.engine_connect_timeout
            ),
        )
        source = resolve(config.model, config.cache_dir)
        tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, source.path)
        model_config = await asyncio.to_thread(AutoConfig.from_pretrained, source.path)
        served, max_len = await _wait_for_models(client, url)
        max_context = max_len or int(getattr(model_config, "max_position_embeddings", 0) or 2048)
        fmt = choose_tool_format(tokenizer, config.tool_call_format, source.label)
        log.info("remote engine", url=url, served_model=served, max_context=max_context)
        engine = cls(
            client,
            tokenizer,
            label=source.label,
            url=url,
            served_model=served,
            max_context=max_context,
            tool_call_format=fmt,
            default_max_new_tokens=config.max_new_tokens,
        )
        engine.rules = TokenRules.of(tokenizer, fmt, model_config)
        return engine

    @property
    def info(self) -> EngineInfo:
        return self._info

    async def healthy(self) -> bool:
        try:
            response = await self._client.get("/health", timeout=5.0)
            if response.status_code == 404:  # a server without /health
                response = await self._client.get("/v1/models", timeout=5.0)
            return response.status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        for request_id in list(self._active):
            self.abort(request_id)
        try:
            asyncio.get_running_loop().create_task(self._client.aclose())
        except RuntimeError:  # no loop left: the sockets go with the process
            pass

    def _body(self, tokens: Tokenized, request: GenerationRequest) -> dict:
        s = request.sampling
        body = {
            "model": self._served,
            "prompt": tokens.prompt,
            "max_tokens": tokens.limit,
            "stream": True,
            "return_token_ids": True,  # vLLM; other servers ignore it
        }
        if tokens.forced is not None:
            body.update(temperature=0.0, ignore_eos=True, vllm_xargs={FORCED_KEY: tokens.forced})
            return body
        body.update(temperature=s.temperature, top_p=s.top_p)
        if s.top_k:
            body["top_k"] = s.top_k
        if s.seed is not None:
            body["seed"] = s.seed
        return body

    async def _chunks(
        self, engine_id: str, tokens: Tokenized, request: GenerationRequest
    ) -> AsyncIterator[TokenChunk]:
        try:
            async with self._client.stream(
                "POST", "/v1/completions", json=self._body(tokens, request)
            ) as response:
                if response.status_code != 200:
                    detail = (await response.aread())[:2000].decode("utf-8", "replace")
                    if 400 <= response.status_code < 500:
                        raise RequestError(
                            f"the engine server refused the request "
                            f"({response.status_code}): {_error_message(detail)}"
                        )
                    raise EngineUnavailable(
                        f"the engine server answered {response.status_code}: "
                        f"{_error_message(detail)}"
                    )
                async for chunk in self._parse(response):
                    yield chunk
        except (httpx.ConnectError, httpx.ConnectTimeout) as e:
            raise EngineUnavailable(f"cannot reach the engine server: {e!r}") from None
        except (httpx.HTTPError, BadStream) as e:
            yield TokenChunk([], FinishReason.ERROR, message=f"engine server stream failed: {e}")

    async def _parse(self, response: httpx.Response) -> AsyncIterator[TokenChunk]:
        async for line in _bounded_lines(response):
            if not line.startswith("data:"):
                continue  # SSE comments, event names, keep-alives
            data = line[5:].strip()
            if data == "[DONE]":
                return
            try:
                event = json.loads(data)
            except json.JSONDecodeError:
                raise BadStream(f"not JSON: {data[:200]!r}") from None
            yield self._chunk(event)

    def _chunk(self, event) -> TokenChunk:
        if not isinstance(event, dict):
            raise BadStream("an event that is not an object")
        if "error" in event:
            detail = _error_message(json.dumps(event["error"], default=str))
            return TokenChunk([], FinishReason.ERROR, message=f"engine server: {detail}")
        choices = event.get("choices")
        if not isinstance(choices, list):
            raise BadStream("an event without choices")
        if not choices:  # the usage chunk
            return TokenChunk([])
        choice = choices[0]
        if not isinstance(choice, dict):
            raise BadStream("a choice that is not an object")
        ids = choice.get("token_ids")
        if ids is None:
            text = choice.get("text") or ""
            if not isinstance(text, str):
                raise BadStream("a choice whose text is not a string")
            ids = self.tokenizer.encode(text, add_special_tokens=False) if text else []
        elif not (
            isinstance(ids, list) and all(type(t) is int and 0 <= t < self._vocab for t in ids)
        ):
            raise BadStream(f"token_ids outside the vocabulary of {self._vocab}")
        reason = choice.get("finish_reason")
        finish = None
        if reason is not None:
            finish = (
                _FINISH.get(reason, FinishReason.ERROR)
                if isinstance(reason, str)
                else (FinishReason.ERROR)
            )
        return TokenChunk(
            ids=ids,
            finish=finish,
            message=f"the engine server ended it: {reason!r}"
            if finish is FinishReason.ERROR
            else "",
        )

    async def _cancel(self, engine_id: str) -> None:
        """Closing the stream (relay's aclose) is the cancel OpenAI servers know."""


async def _bounded_lines(response: httpx.Response) -> AsyncIterator[str]:
    """The body's lines, none longer than MAX_LINE_BYTES."""
    pending = b""
    async for block in response.aiter_bytes():
        pending += block
        *lines, pending = pending.split(b"\n")
        if len(pending) > MAX_LINE_BYTES:
            raise BadStream(f"a line over {MAX_LINE_BYTES} bytes")
        for line in lines:
            yield line.decode("utf-8", "replace").rstrip("\r")
    if pending:
        yield pending.decode("utf-8", "replace")


async def _wait_for_models(client: httpx.AsyncClient, url: str) -> tuple[str, int]:
    """The first served model and its context (0 when the server does not
    say), once the server answers; retries while it starts."""
    delay = 0.5
    while True:
        try:
            response = await client.get("/v1/models", timeout=10.0)
            if response.status_code == 200:
                models = response.json().get("data") or []
                if models and isinstance(models[0], dict) and isinstance(models[0].get("id"), str):
                    max_len = models[0].get("max_model_len")
                    return models[0]["id"], max_len if type(max_len) is int and max_len > 0 else 0
            log.info("engine server not ready", url=url, status=response.status_code)
        except (httpx.HTTPError, ValueError) as e:
            log.info("waiting for the engine server", url=url, error=type(e).__name__)
        await asyncio.sleep(delay)
        delay = min(delay * 2, 5.0)


def _error_message(detail: str) -> str:
    try:
        body = json.loads(detail)
    except json.JSONDecodeError:
        return detail
    error = body.get("error", body) if isinstance(body, dict) else body
    if isinstance(error, dict) and "message" in error:
        return str(error["message"])
    return str(error)
