# Regenerates gemma3_greedy.json: llama.cpp's greedy continuations (64 tokens,
# temperature 0) of raw prompts on gemma-3-270m-q4_k_m.gguf, for
# crates/model/tests/gemma3.rs. Start the baseline server first, e.g.
#   llama-server -m gemma-3-270m-q4_k_m.gguf -t 2 --no-repack --port 8091 -c 4096 -fa off
# Flash attention off: its f16 accumulation is noisier than kvserve's f32
# attention, and with it on llama.cpp's own answers differ from these at
# token 4 of the first prompt and token 2 of the fourth.
# then: python3 gen_gemma3_greedy.py http://127.0.0.1:8091 OUT.json
import json, sys, urllib.request

url, out = sys.argv[1], sys.argv[2]
prompts = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes,",
]

def post(path, body):
    req = urllib.request.Request(url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})
    return json.load(urllib.request.urlopen(req))

cases = []
for p in prompts:
    ids = post("/tokenize", {"content": p, "add_special": True})["tokens"]
    r = post("/completion", {"prompt": ids, "n_predict": 64, "temperature": 0, "top_k": 1, "cache_prompt": False,
                             "return_tokens": True, "ignore_eos": True})
    first = post("/completion", {"prompt": ids, "n_predict": 1, "temperature": 0, "n_probs": 5, "cache_prompt": False})
    top = [[t["id"], round(t["logprob"], 4)] for t in first["completion_probabilities"][0]["top_logprobs"]]
    cases.append({"prompt": p, "prompt_ids": ids, "tokens": r["tokens"], "text": r["content"], "first_top5": top})
with open(out, "w") as f:
    f.write("[\n" + ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]\n")
print(len(cases))
