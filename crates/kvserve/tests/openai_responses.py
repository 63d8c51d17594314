"""The Responses API through the official `openai` client against kvserve
(crates/kvserve/tests/openai_client.rs runs this with the server's URL).
Greedy throughout; prints "ok" last when every check passed."""
import json
import sys

import openai
from openai import OpenAI
from pydantic import BaseModel

base = sys.argv[1]
client = OpenAI(base_url=base + "/v1", api_key="unused")
M = "smollm2-135m"
SYS = "You are a helpful assistant. Answer in one short sentence."


def cached(r):
    return r.usage.input_tokens_details.cached_tokens


# A response, then a chain continuing it: the chain's prefix is cached.
r1 = client.responses.create(model=M, instructions=SYS, input="What is the capital of France?",
                             temperature=0, max_output_tokens=32)
assert r1.status == "completed", r1
assert "Paris" in r1.output_text, r1.output_text
assert r1.usage.input_tokens > 0 and r1.usage.output_tokens > 0
r2 = client.responses.create(model=M, instructions=SYS, input="And what is the capital of Italy?",
                             previous_response_id=r1.id, temperature=0, max_output_tokens=32)
assert r2.previous_response_id == r1.id
assert cached(r2) >= r1.usage.input_tokens + r1.usage.output_tokens - 32, (cached(r2), r1.usage)
print("chain:", r2.output_text, "cached", cached(r2), "of", r2.usage.input_tokens)

# Streaming with the client's helper: events in order, deltas add up.
kinds, deltas = [], []
with client.responses.stream(model=M, instructions=SYS, input="And of Spain?", previous_response_id=r2.id,
                             temperature=0, max_output_tokens=32) as stream:
    for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
    final = stream.get_final_response()
assert kinds[0] == "response.created" and kinds[1] == "response.in_progress", kinds
assert kinds[-1] == "response.completed", kinds
for k in ["response.output_item.added", "response.content_part.added", "response.output_text.done",
          "response.content_part.done", "response.output_item.done"]:
    assert k in kinds, (k, kinds)
assert "".join(deltas) == final.output_text and final.output_text, (deltas, final.output_text)
assert cached(final) >= r2.usage.input_tokens + r2.usage.output_tokens - 32, (cached(final), r2.usage)
print("stream:", len(kinds), "events")

# A fork from an older response shares its cached prefix.
fork = client.responses.create(model=M, instructions=SYS, input="And of Germany?", previous_response_id=r1.id,
                               temperature=0, max_output_tokens=32)
assert cached(fork) >= r1.usage.input_tokens + r1.usage.output_tokens - 32, (cached(fork), r1.usage)

# Function tools (strict by default): a call, its output, the answer, with
# the call kept verbatim in the stored context.
tools = [{"type": "function", "name": "get_weather", "description": "The weather in a city.",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                         "additionalProperties": False}}]
call_r = client.responses.create(model=M, input="What is the weather in Paris?", tools=tools,
                                 tool_choice="required", temperature=0, max_output_tokens=64)
calls = [o for o in call_r.output if o.type == "function_call"]
assert calls and calls[0].name == "get_weather", call_r.output
args = json.loads(calls[0].arguments)
assert isinstance(args.get("city"), str), args
# tool_choice "none" keeps the tools described (the prefix stays cached)
# and asks for a plain answer.
answer = client.responses.create(model=M, previous_response_id=call_r.id, tools=tools, tool_choice="none",
                                 temperature=0, max_output_tokens=32,
                                 input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                         "output": "Sunny, 21 degrees."}])
assert answer.output_text, answer.output
assert cached(answer) >= call_r.usage.input_tokens + call_r.usage.output_tokens - 32, (cached(answer), call_r.usage)
print("tools:", calls[0].arguments, "->", answer.output_text)

# text.format from a Pydantic model.
class City(BaseModel):
    name: str
    country: str


parsed = client.responses.parse(model=M, input="Name a big city in Japan.", text_format=City, temperature=0,
                                max_output_tokens=64)
assert isinstance(parsed.output_parsed, City), parsed.output
print("parsed:", parsed.output_parsed)

# Retrieve, input items, delete.
got = client.responses.retrieve(r2.id)
assert got.id == r2.id and got.output_text == r2.output_text
items = client.responses.input_items.list(r2.id)
assert [i.type for i in items.data] == ["message"], items
assert items.data[0].content[0].text == "And what is the capital of Italy?", items.data[0]
client.responses.delete(fork.id)
try:
    client.responses.retrieve(fork.id)
    raise AssertionError("a deleted response is still there")
except openai.NotFoundError:
    pass

# store=False keeps nothing.
gone = client.responses.create(model=M, input="Say hi.", store=False, temperature=0, max_output_tokens=8)
try:
    client.responses.retrieve(gone.id)
    raise AssertionError("store=False was stored")
except openai.NotFoundError:
    pass

# Conversations: CRUD, and responses in one keep its agent warm.
conv = client.conversations.create(metadata={"topic": "travel"},
                                   items=[{"type": "message", "role": "user", "content": "I am planning a trip."}])
assert conv.id.startswith("conv_") and conv.metadata == {"topic": "travel"}, conv
c1 = client.responses.create(model=M, instructions=SYS, conversation=conv.id, input="Where should I go in France?",
                             temperature=0, max_output_tokens=32)
assert c1.output_text, c1
c2 = client.responses.create(model=M, instructions=SYS, conversation=conv.id, input="And what should I eat there?",
                             temperature=0, max_output_tokens=32)
assert cached(c2) >= c1.usage.input_tokens + c1.usage.output_tokens - 32, (cached(c2), c1.usage)
listed = client.conversations.items.list(conv.id, order="asc")
kinds = [(i.type, getattr(i, "role", None)) for i in listed.data]
assert kinds == [("message", "user"), ("message", "user"), ("message", "assistant"), ("message", "user"),
                 ("message", "assistant")], kinds
added = client.conversations.items.create(conv.id, items=[{"type": "message", "role": "user", "content": "Thanks!"}])
one = client.conversations.items.retrieve(added.data[0].id, conversation_id=conv.id)
assert one.content[0].text == "Thanks!", one
# Deleting an item from the middle: the next response recomputes from it.
client.conversations.items.delete(listed.data[1].id, conversation_id=conv.id)
assert len(client.conversations.items.list(conv.id).data) == 5
c3 = client.responses.create(model=M, instructions=SYS, conversation=conv.id, input="Bye.", temperature=0,
                             max_output_tokens=8)
assert cached(c3) < c3.usage.input_tokens, c3.usage
updated = client.conversations.update(conv.id, metadata={"topic": "food"})
assert client.conversations.retrieve(conv.id).metadata == {"topic": "food"}, updated
client.conversations.delete(conv.id)
try:
    client.conversations.retrieve(conv.id)
    raise AssertionError("a deleted conversation is still there")
except openai.NotFoundError:
    pass
print("conversations: ok")

# What cannot be honoured is a 400 naming the field.
for kwargs, param in [
    ({"input": [{"type": "bogus"}]}, "input"),
    ({"input": [{"type": "function_call_output", "call_id": "call_none", "output": "x"}]}, "input"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools"),
    ({"input": "x", "previous_response_id": "resp_missing"}, "previous_response_id"),
]:
    try:
        client.responses.create(model=M, **kwargs)
        raise AssertionError(f"accepted: {kwargs}")
    except (openai.BadRequestError, openai.NotFoundError) as e:
        assert e.body.get("param") == param, (kwargs, e.body)
# Sent empty, as clients do, they are accepted.
ok = client.responses.create(model=M, input="Say hi.", reasoning=None, background=False, temperature=0,
                             max_output_tokens=4)
assert ok.status in ("completed", "incomplete"), ok
print("ok")
