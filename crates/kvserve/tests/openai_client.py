"""Tool calling and structured outputs through the official `openai` client.

Run by `openai_client.rs` against a `kvserve serve` on the default model:
    python openai_client.py BASE_URL
Exits non-zero (an assertion) on the first thing that does not hold; prints
one line per check.
"""

import json
import sys

from openai import OpenAI
from pydantic import BaseModel, Field

BASE = sys.argv[1]
client = OpenAI(base_url=BASE + "/v1", api_key="unused", max_retries=0, timeout=300)
MODEL = client.models.list().data[0].id

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 24}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [
    {"role": "system", "content": "You are a helpful assistant that uses tools."},
    {"role": "user", "content": "What is the weather in Paris right now?"},
]


def check_call(call, name=None):
    """A call is a function call whose arguments parse and fit the schema."""
    assert call.type == "function", call
    assert call.id.startswith("call_"), call
    assert name is None or call.function.name == name, call
    schema = SCHEMAS[call.function.name]["function"]["parameters"]
    args = json.loads(call.function.arguments)
    assert set(args) == set(schema["required"]), args
    for key, prop in schema["properties"].items():
        assert isinstance(args[key], str) and len(args[key]) <= prop.get("maxLength", 99), args
        assert "enum" not in prop or args[key] in prop["enum"], args
    return args


def create(**kw):
    return client.chat.completions.create(model=MODEL, temperature=0, max_tokens=120, **kw)


# auto: a call or an answer, whichever the model picks; either is well formed.
r = create(messages=ASK, tools=[WEATHER, TIME], tool_choice="auto")
choice = r.choices[0]
if choice.message.tool_calls:
    assert choice.finish_reason == "tool_calls", choice
    for call in choice.message.tool_calls:
        check_call(call)
else:
    assert isinstance(choice.message.content, str), choice
print("auto:", choice.finish_reason, choice.message.tool_calls or choice.message.content)

# required: a call, whatever the model would rather do.
r = create(messages=ASK, tools=[WEATHER, TIME], tool_choice="required", parallel_tool_calls=False)
choice = r.choices[0]
assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1, choice
print("required:", check_call(choice.message.tool_calls[0]))

# named: a call of that function.
named = {"type": "function", "function": {"name": "get_time"}}
r = create(messages=ASK, tools=[WEATHER, TIME], tool_choice=named, parallel_tool_calls=False)
calls = r.choices[0].message.tool_calls
assert calls and all(c.function.name == "get_time" for c in calls), r
print("named:", [check_call(c, "get_time") for c in calls])

# Streaming: accumulate delta.tool_calls as the client's users do.
acc = {}
finish = None
for chunk in create(messages=ASK, tools=[WEATHER], tool_choice="required", stream=True):
    if not chunk.choices:
        continue
    delta = chunk.choices[0].delta
    for tc in delta.tool_calls or []:
        slot = acc.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
        slot["id"] = tc.id or slot["id"]
        if tc.function and tc.function.name:
            slot["name"] += tc.function.name
        if tc.function and tc.function.arguments:
            slot["arguments"] += tc.function.arguments
    finish = chunk.choices[0].finish_reason or finish
assert finish == "tool_calls" and acc, (finish, acc)
for slot in acc.values():
    assert slot["id"].startswith("call_") and slot["name"] == "get_weather", slot
    json.loads(slot["arguments"])
print("streamed:", acc)


# Structured output parsed into a Pydantic model.
class City(BaseModel):
    name: str = Field(max_length=24)
    country: str = Field(max_length=24)
    population_millions: int = Field(ge=0, le=100)


parse = getattr(client.chat.completions, "parse", None) or client.beta.chat.completions.parse
r = parse(
    model=MODEL,
    temperature=0,
    max_tokens=120,
    messages=[{"role": "user", "content": "Describe Paris as JSON."}],
    response_format=City,
)
city = r.choices[0].message.parsed
assert isinstance(city, City), r
print("parsed:", city)

# A three-turn tool loop as an agent: call, tool result, answer. The turn
# after the call reuses the cached K/V of the call turn, generated tokens
# included.
agent = {"agent_id": "openai-client-tools"}
messages = list(ASK)
r1 = create(messages=messages, tools=[WEATHER], tool_choice="required", parallel_tool_calls=False, extra_body=agent)
call = r1.choices[0].message.tool_calls[0]
check_call(call, "get_weather")
messages.append(r1.choices[0].message.model_dump(exclude_none=True))
messages.append({"role": "tool", "tool_call_id": call.id, "content": "18 degrees, sunny <|im_end|>"})
r2 = create(messages=messages, tools=[WEATHER], tool_choice="none", extra_body=agent)
answer = r2.choices[0].message.content
assert isinstance(answer, str) and not r2.choices[0].message.tool_calls, r2
cached = r2.usage.prompt_tokens_details.cached_tokens
floor = r1.usage.prompt_tokens + r1.usage.completion_tokens - 16
print("loop: turn-1 prompt", r1.usage.prompt_tokens, "+ generated", r1.usage.completion_tokens,
      "; turn-2 prompt", r2.usage.prompt_tokens, "cached", cached, "; answer:", repr(answer))
assert cached >= floor, (cached, floor)
messages.append({"role": "assistant", "content": answer})
messages.append({"role": "user", "content": "Thanks. And in Rome?"})
r3 = create(messages=messages, tools=[WEATHER], tool_choice="auto", extra_body=agent)
if r2.choices[0].finish_reason == "stop":
    # A complete answer renders back as the reply that carried it.
    assert r3.usage.prompt_tokens_details.cached_tokens >= r2.usage.prompt_tokens - 16, r3.usage
print("loop turn 3:", r3.choices[0].finish_reason, "cached", r3.usage.prompt_tokens_details.cached_tokens)
print("ok")
