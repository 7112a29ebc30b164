"""Real clients against `llamaforge serve` with the built-in model (SmolLM2-135M-Instruct): the `openai` client's
structured outputs and streamed tool calls, and an openai-agents agent running a two-tool loop. Forced tool
choice makes the small model's calls deterministic and valid."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import pytest
from conftest import API_KEY, Running, run_server

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.slow  # the real model: seconds to load, then a few hundred tokens on the CPU
NAME = "smollm2"


@pytest.fixture(scope="module")
def builtin(smollm2_gguf: Path) -> Iterator[Running]:
    with run_server(smollm2_gguf, api_key=API_KEY, model_name=NAME, max_batch=4, max_seq_len=2048) as running:
        yield running


def test_parse_and_streamed_tool_calls_with_the_builtin_model(builtin: Running) -> None:
    from pydantic import BaseModel, Field

    class City(BaseModel):
        name: str = Field(max_length=20)
        country: Literal["France", "Japan", "Peru"]
        population_millions: int = Field(ge=0, le=50)

    client = builtin.client(timeout=600)
    ask = [{"role": "user", "content": "Describe Paris as JSON."}]
    parsed = client.chat.completions.parse(model=NAME, messages=ask, response_format=City, temperature=0,
                                           max_tokens=60).choices[0].message.parsed  # fmt: skip
    assert isinstance(parsed, City) and parsed.country == "France"

    weather = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30}},
                              "required": ["city"], "additionalProperties": False}}}  # fmt: skip
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "What is the weather in Tokyo?"}], tools=[weather],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, temperature=0, stream=True,
        max_tokens=60,
    )  # fmt: skip
    names, ids, args, finish = [], [], "", None
    for chunk in stream:
        choice = chunk.choices[0]
        finish = choice.finish_reason or finish
        for tc in choice.delta.tool_calls or []:
            names += [tc.function.name] if tc.function.name else []
            ids += [tc.id] if tc.id else []
            args += tc.function.arguments or ""
    assert names == ["get_weather"] and len(ids) == 1 and finish == "tool_calls"
    assert json.loads(args) == {"city": "Tokyo"}


def test_openai_agents_two_tool_loop(builtin: Running) -> None:
    pytest.importorskip("agents")
    from agents import (
        Agent,
        ModelSettings,
        OpenAIChatCompletionsModel,
        RunHooks,
        Runner,
        StopAtTools,
        function_tool,
        set_tracing_disabled,
    )

    set_tracing_disabled(True)  # no trace export: the test runs offline
    called: list[tuple[str, str]] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        called.append(("get_weather", city))
        return f"It is sunny and 21 C in {city}."

    @function_tool
    def get_time(city: str) -> str:
        """The local time in a city."""
        called.append(("get_time", city))
        return f"It is 14:05 in {city}."

    class Next(RunHooks):
        """After the weather, force the time: each turn's tool choice is fixed, so the loop is deterministic."""

        async def on_tool_end(self, context, agent, tool, result) -> None:  # type: ignore[override]
            if tool.name == "get_weather":
                agent.model_settings = ModelSettings(tool_choice="get_time", temperature=0, max_tokens=40)

    client = openai.AsyncOpenAI(base_url=builtin.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=600)
    agent = Agent(
        name="assistant",
        instructions="Answer questions about cities with the tools.",
        tools=[get_weather, get_time],
        model=OpenAIChatCompletionsModel(model=NAME, openai_client=client),
        model_settings=ModelSettings(tool_choice="get_weather", temperature=0, max_tokens=40),
        reset_tool_choice=False,
        tool_use_behavior=StopAtTools(stop_at_tool_names=["get_time"]),
    )
    result = asyncio.run(Runner.run(agent, "What is the weather and the time in Paris?", hooks=Next(), max_turns=4))
    assert [name for name, _ in called] == ["get_weather", "get_time"]
    assert all(city.strip() for _, city in called)
    assert result.final_output == f"It is 14:05 in {called[1][1]}."
