"""The stand-in follows RKLLAMA_API.md, quirks included (checked over raw HTTP, without exo)."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
from exo_rkllm.fake_server import FakeRKLLAMA, Fault, answer_pieces, fake_answer, in_subprocess

FAST = {"tokens_per_second": 500.0, "first_token_ms": 10.0}
HI = [{"role": "user", "content": "héllo"}]


async def call(session, method, url, body=None):
    async with session.request(method, url, json=body) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text), resp.content_type
        except ValueError:
            return resp.status, text, resp.content_type


async def test_fork_routes_and_their_errors():
    async with FakeRKLLAMA(dialect="fork", models=("A", "B"), **FAST) as s, aiohttp.ClientSession() as http:
        u = s.url
        assert (await call(http, "GET", u + "/"))[0] == 200
        status, body, ctype = await call(http, "GET", u + "/api/version")
        assert status == 404 and ctype == "text/html"
        assert await call(http, "GET", u + "/models") == (200, {"models": ["A", "B"]}, "application/json")
        assert (await call(http, "GET", u + "/current_model"))[:2] == (
            404,
            {"error": "No models are currently loaded."},
        )
        assert (await call(http, "POST", u + "/generate", {"messages": HI}))[:2] == (
            400,
            {"error": "No models are currently loaded."},
        )
        assert (await call(http, "POST", u + "/load_model", {"model_name": "C"}))[:2] == (
            400,
            {"error": "Model directory 'C' not found."},
        )
        assert (await call(http, "POST", u + "/load_model", {"model_name": "A"}))[:2] == (
            200,
            {"message": "Model A loaded successfully."},
        )
        assert (await call(http, "POST", u + "/load_model", {"model_name": "B"}))[:2] == (
            400,
            {"error": "A model is already loaded. Please unload it first."},
        )
        assert (await call(http, "GET", u + "/current_model"))[:2] == (200, {"model_name": "A"})
        status, body, _ = await call(http, "POST", u + "/generate", {"stream": False})
        assert (status, body) == (400, {"status": "error", "message": "Données JSON invalides !"})
        two_systems = [{"role": "system", "content": "S"}, *HI]
        status, body, ctype = await call(http, "POST", u + "/generate", {"messages": two_systems})
        assert status == 500 and ctype == "text/html" and "Internal Server Error" in body
        not_alternating = [*HI, *HI]
        assert (await call(http, "POST", u + "/generate", {"messages": not_alternating}))[0] == 500
        status, body, _ = await call(http, "POST", u + "/generate", {"messages": HI})  # stream: false
        assert status == 200 and body["choices"][0]["content"] == fake_answer(HI)
        assert body["choices"][0]["finish_reason"] == "stop" and "message" not in body["choices"][0]
        assert body["usage"]["completion_tokens"] == len(answer_pieces(fake_answer(HI)))
        assert (await call(http, "POST", u + "/unload_model"))[:2] == (
            200,
            {"message": "Model successfully unloaded!"},
        )
        assert (await call(http, "POST", u + "/unload_model"))[:2] == (
            400,
            {"error": "No models are currently loaded."},
        )
        assert [r.path for r in s.requests][:3] == ["/", "/api/version", "/models"]


async def test_fork_stream_splits_objects_and_characters_across_reads_and_has_no_final_chunk():
    async with FakeRKLLAMA(dialect="fork", **FAST) as s, aiohttp.ClientSession() as http:
        await call(http, "POST", s.url + "/load_model", {"model_name": "SmolLM2-135M-Instruct"})
        reads: list[bytes] = []
        async with http.post(s.url + "/generate", json={"messages": HI, "stream": True}) as resp:
            assert resp.content_type == "text/plain"
            async for data in resp.content.iter_any():
                reads.append(data)
    body = b"".join(reads)
    objects = [json.loads(part) for part in body.decode("utf-8").split("\n\n") if part]
    assert "".join(o["choices"][0]["content"] for o in objects) == fake_answer(HI)
    assert all(o["choices"][0]["finish_reason"] is None for o in objects)
    assert objects[-1]["choices"][0]["content"] == answer_pieces(fake_answer(HI))[-1]  # no final chunk
    assert any(not r.endswith(b"\n\n") for r in reads)  # objects split across reads
    undecodable = 0
    for r in reads:
        try:
            r.decode("utf-8")
        except UnicodeDecodeError:
            undecodable += 1
    assert undecodable > 0  # and multi-byte characters too


async def test_fork_serialises_non_streaming_requests_but_lets_streams_interleave():
    async with FakeRKLLAMA(dialect="fork", tokens_per_second=100, first_token_ms=0) as s:
        async with aiohttp.ClientSession() as http:
            await call(http, "POST", s.url + "/load_model", {"model_name": "SmolLM2-135M-Instruct"})
            started = time.monotonic()
            await asyncio.gather(
                *(call(http, "POST", s.url + "/generate", {"messages": HI}) for _ in range(2))
            )
            serial = time.monotonic() - started
            single = (len(answer_pieces(fake_answer(HI))) - 1) / 100
            assert serial > 1.8 * single
            assert s.state.max_concurrent == 1
            body = {"messages": HI, "stream": True}
            texts = await asyncio.gather(*(_stream_text(http, s.url + "/generate", body) for _ in range(2)))
            assert s.state.max_concurrent == 2 and fake_answer(HI) not in texts  # garbled


async def _stream_text(http, url, body) -> str:
    async with http.post(url, json=body) as resp:
        raw = await resp.read()
    return "".join(json.loads(p)["choices"][0]["content"] for p in raw.decode().split("\n\n") if p)


async def test_fork_models_is_500_without_a_models_folder(tmp_path):
    async with FakeRKLLAMA(dialect="fork", models_dir=tmp_path / "missing", **FAST) as s:
        async with aiohttp.ClientSession() as http:
            assert (await call(http, "GET", s.url + "/models"))[0] == 500


async def test_upstream_routes_ndjson_and_done_chunk():
    async with (
        FakeRKLLAMA(dialect="upstream", models=("A", "B"), **FAST) as s,
        aiohttp.ClientSession() as http,
    ):
        u = s.url
        assert (await call(http, "GET", u + "/api/version"))[:2] == (200, {"version": "0.0.74"})
        tags = (await call(http, "GET", u + "/api/tags"))[1]
        assert [m["name"] for m in tags["models"]] == ["A", "B"] and "details" in tags["models"][0]
        assert (await call(http, "GET", u + "/api/ps"))[1] == {"models": []}
        async with http.post(
            u + "/api/chat", json={"model": "A", "messages": HI}
        ) as resp:  # stream by default
            assert resp.content_type == "application/x-ndjson"
            lines = [json.loads(line) for line in (await resp.read()).decode().splitlines()]
        *pieces, final = lines
        assert "".join(p["message"]["content"] for p in pieces) == fake_answer(HI)
        assert all(p["done"] is False for p in pieces)
        assert final["done"] is True and final["done_reason"] == "stop" and final["message"]["content"] == ""
        assert final["eval_count"] == len(pieces) and final["prompt_eval_count"] > 0
        # The durations quirk: total in nanoseconds, prompt/eval durations in milliseconds.
        assert final["total_duration"] > 1000 * final["eval_duration"]
        assert [m["name"] for m in (await call(http, "GET", u + "/api/ps"))[1]["models"]] == ["A"]
        status, body, _ = await call(
            http, "POST", u + "/api/chat", {"model": "A", "messages": HI, "stream": False}
        )
        assert status == 200 and body["message"]["content"] == fake_answer(HI) and body["done"]
        assert (await call(http, "POST", u + "/api/chat", {"model": "Z", "messages": HI}))[0] == 404
        s.faults.append(Fault("load_failure", times=1))
        status, body, _ = await call(http, "POST", u + "/api/chat", {"model": "B", "messages": HI})
        assert status == 500 and body["error"].startswith("Failed to load model 'B'")


async def test_upstream_openai_route():
    async with FakeRKLLAMA(dialect="upstream", **FAST) as s, aiohttp.ClientSession() as http:
        url = s.url + "/v1/chat/completions"
        body = {"model": "SmolLM2-135M-Instruct", "messages": HI}
        status, full, _ = await call(http, "POST", url, body)  # stream defaults to false
        assert status == 200 and full["choices"][0]["message"]["content"] == fake_answer(HI)
        async with http.post(url, json={**body, "stream": True}) as resp:
            assert resp.content_type == "text/event-stream"
            events = [e for e in (await resp.read()).decode().split("\n\n") if e]
        assert events[-1] == "data: [DONE]"
        deltas = [json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1]]
        assert "".join(deltas) == fake_answer(HI)


async def test_upstream_queues_fifo_per_model_and_aborts_after_its_timeout():
    settings = {"tokens_per_second": 50.0, "first_token_ms": 0.0, "abort_timeout_s": 0.3}
    async with FakeRKLLAMA(dialect="upstream", models=("A", "B"), **settings) as s:
        async with aiohttp.ClientSession() as http:
            u = s.url + "/api/chat"
            one = {"model": "A", "messages": HI, "stream": False}  # ~1.3 s of answer
            first, queued, other_model, queued_stream = await asyncio.gather(
                call(http, "POST", u, one),
                call(http, "POST", u, one),
                call(http, "POST", u, {**one, "model": "B"}),
                _ndjson(http, u, {**one, "stream": True}),
            )
    assert first[1]["message"]["content"] == fake_answer(HI)
    assert other_model[1]["message"]["content"] == fake_answer(HI)  # another model's worker
    # Waiting longer than the timeout: 200 with the abort text, or a done chunk with zero counts.
    assert (
        queued[0] == 200
        and queued[1]["message"]["content"] == "Aborted inference by Timeout (0 seconds). Try again."
    )
    assert queued_stream[-1]["done"] and queued_stream[-1]["eval_count"] == 0
    assert queued_stream[-1]["prompt_eval_count"] == 0


async def _ndjson(http, url, body) -> list[dict]:
    async with http.post(url, json=body) as resp:
        return [json.loads(line) for line in (await resp.read()).decode().splitlines()]


@pytest.mark.parametrize("dialect", ["fork", "upstream"])
async def test_requests_and_faults_over_http(dialect):
    async with FakeRKLLAMA(dialect=dialect, **FAST) as s, aiohttp.ClientSession() as http:
        await call(http, "GET", s.url + "/")
        status, fault, _ = await call(http, "POST", s.url + "/_fake/faults", {"kind": "http500", "times": 1})
        assert status == 200 and fault["kind"] == "http500" and s.faults
        assert (await call(http, "POST", s.url + "/_fake/faults", {"kind": "nope"}))[0] == 400
        recorded = (await call(http, "GET", s.url + "/_fake/requests"))[1]
        assert [(r["method"], r["path"]) for r in recorded] == [("GET", "/")]
        await call(http, "DELETE", s.url + "/_fake/requests")
        assert s.requests == []


def test_runs_as_a_subprocess():
    with in_subprocess("--dialect", "upstream", "--tokens-per-second", "100") as url:
        assert url.startswith("http://127.0.0.1:")

        async def probe():
            async with aiohttp.ClientSession() as http:
                return await call(http, "GET", url + "/api/version")

        assert asyncio.run(probe())[0] == 200
