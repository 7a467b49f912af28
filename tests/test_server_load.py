"""Issue 7, server under load: the OpenAI server on a tiny OutlierTune W8A8 checkpoint answers a burst of concurrent
completions, chats and streams, refuses invalid requests with a 4xx and a message, stays healthy, and gives the
same greedy text for the same prompt all through. CPU, 127.0.0.1 only, bounded in time and in requests (about
1-2 minutes on 2 cores, most of it server start-up). Prints requests/s and p50/p99 latency."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import defaultdict

import pytest

from tests.servers import healthy, openai_server

pytest.importorskip("vllm")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.vllm

REQUEST_TIMEOUT_S = 120
BURST_TIMEOUT_S = 240
MAX_TOKENS = 8
PROMPTS = ["The old lighthouse keeper", "In the town the market", "Science begins with", "The river crossed",
           "On Sunday the family", "Numbers can be written"]
QUESTIONS = ["Where is the lighthouse?", "What did the farmers bring?", "Why is the sky blue?"]
ROUNDS = 11  # each round: every prompt as completion and streamed completion, every question as chat and stream
INVALID_KINDS = ("negative_max_tokens", "unknown_model", "chat_negative_max_tokens", "prompt_too_long")


# ---------------------------------------------------------------- one request of each kind
# Each returns (key, text): requests with the same key must give the same greedy text.


async def _completion(client, model, prompt):
    result = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                             extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert choice.finish_reason == "length" and result.usage.completion_tokens == MAX_TOKENS, result
    return ("completion", prompt), choice.text


async def _completion_stream(client, model, prompt):
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0.0,
                                             stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True})
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "length" and usage is not None and usage.completion_tokens == MAX_TOKENS, (finish, usage)
    return ("completion", prompt), "".join(text)  # streamed text must equal the non-streamed one


def _messages(question):
    return [{"role": "user", "content": question}]


async def _chat(client, model, question):
    result = await client.chat.completions.create(model=model, messages=_messages(question), max_tokens=MAX_TOKENS,
                                                  temperature=0.0, extra_body={"ignore_eos": True})
    choice = result.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant", result
    assert result.usage.completion_tokens == MAX_TOKENS, result
    return ("chat", question), choice.message.content


async def _chat_stream(client, model, question):
    stream = await client.chat.completions.create(model=model, messages=_messages(question), max_tokens=MAX_TOKENS,
                                                  temperature=0.0, stream=True,
                                                  stream_options={"include_usage": True},
                                                  extra_body={"ignore_eos": True})
    text, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            text.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert finish == "length" and usage is not None and usage.completion_tokens == MAX_TOKENS, (finish, usage)
    return ("chat", question), "".join(text)


async def _invalid(client, model, kind):
    """An invalid request: must raise an API error with a 4xx status and a message naming the problem."""
    if kind == "negative_max_tokens":
        call, needle = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=-1), "max_tokens"
    elif kind == "chat_negative_max_tokens":
        call, needle = client.chat.completions.create(model=model, messages=_messages(QUESTIONS[0]),
                                                      max_tokens=-5), "max_tokens"
    elif kind == "unknown_model":
        call, needle = client.completions.create(model="no-such-model", prompt=PROMPTS[0], max_tokens=4), \
            "no-such-model"
    elif kind == "prompt_too_long":
        call, needle = client.completions.create(model=model, prompt=[7] * 600, max_tokens=4), "512"
    else:
        raise ValueError(kind)
    try:
        await call
    except openai.APIStatusError as exc:
        assert 400 <= exc.status_code < 500, f"{kind}: status {exc.status_code}"
        assert needle in str(exc.message), f"{kind}: message {exc.message!r} does not mention {needle!r}"
        return exc.status_code
    raise AssertionError(f"{kind}: the server accepted an invalid request")


async def _timed(coroutine):
    start = time.perf_counter()
    result = await coroutine
    return result, time.perf_counter() - start


async def _burst(base: str, model: str):
    """All requests at once; returns (valid results, their latencies, invalid statuses, wall time)."""
    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0,
                                timeout=REQUEST_TIMEOUT_S)
    valid = []
    for _ in range(ROUNDS):
        valid += [_completion(client, model, p) for p in PROMPTS] + [_completion_stream(client, model, p)
                                                                     for p in PROMPTS]
        valid += [_chat(client, model, q) for q in QUESTIONS] + [_chat_stream(client, model, q) for q in QUESTIONS]
    invalid = [_invalid(client, model, kind) for kind in INVALID_KINDS for _ in range(2)]
    # Interleave the invalid requests with the valid ones so they hit a busy server.
    step = len(valid) // len(invalid)
    order = list(valid)
    for position, call in enumerate(invalid):
        order.insert(position * (step + 1), call)
    started = time.perf_counter()
    async with client:
        outcomes = await asyncio.wait_for(asyncio.gather(*(_timed(call) for call in order)), BURST_TIMEOUT_S)
    wall = time.perf_counter() - started
    valid_results = [(result, latency) for result, latency in outcomes if isinstance(result, tuple)]
    statuses = [result for result, _ in outcomes if isinstance(result, int)]
    return valid_results, statuses, wall


def _percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def test_server_under_concurrent_load(tiny_llama, tmp_path):
    checkpoint = tiny_llama["w8a8"]
    model = str(checkpoint)
    with openai_server(checkpoint, tmp_path / "server.log") as (base, server):
        results, statuses, wall = asyncio.run(_burst(base, model))
        expected_valid = ROUNDS * 2 * (len(PROMPTS) + len(QUESTIONS))
        assert len(results) == expected_valid and len(statuses) == 2 * len(INVALID_KINDS)
        assert len(results) + len(statuses) >= 200

        texts = defaultdict(set)
        for (key, text), _ in results:
            assert text, f"{key}: empty answer"
            texts[key].add(text)
        differing = {key: sorted(values) for key, values in texts.items() if len(values) > 1}
        assert not differing, f"greedy outputs differ within the run: {differing}"
        assert len(set().union(*texts.values())) > 1, "every prompt gave the same text: the check means nothing"

        latencies = [latency for _, latency in results]
        total = len(results) + len(statuses)
        print(f"\nload test: {total} concurrent requests ({len(results)} valid, {len(statuses)} invalid -> "
              f"{sorted(set(statuses))}) in {wall:.1f} s: {len(results) / wall:.1f} valid requests/s, "
              f"{len(results) * MAX_TOKENS / wall:.0f} generated tokens/s; latency p50 "
              f"{statistics.median(latencies):.2f} s, p99 {_percentile(latencies, 0.99):.2f} s, "
              f"max {max(latencies):.2f} s")

        # Still healthy and still answering the same greedy text after the burst.
        assert server.poll() is None and healthy(base)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=REQUEST_TIMEOUT_S)
        after = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0.0,
                                          extra_body={"ignore_eos": True})
        assert {after.choices[0].text} == texts[("completion", PROMPTS[0])]
