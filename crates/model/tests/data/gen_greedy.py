# Regenerates gemma3_greedy.json and smollm2_greedy.json: llama.cpp's greedy
# continuations (64 tokens, temperature 0) of 25 raw prompts, and the first
# token's top-5 log-probabilities, for crates/model/tests/gemma3.rs and
# real_model.rs. Start the baseline server on the model first, e.g.
#   llama-server -m gemma-3-270m-q4_k_m.gguf -t 2 --no-repack --port 8091 -c 4096 -fa off
# then: python3 gen_greedy.py http://127.0.0.1:8091 OUT.json
# Flash attention off: the reference is llama.cpp's plain attention. With
# `-fa on` llama.cpp's own continuations agree with these on 16 tokens for
# 12 of the 25 prompts on Gemma-3 270M and 7 of 25 on SmolLM2-135M, and its
# first-token log-probabilities differ from them by a mean of 0.074 and
# 0.078 nats: that is the noise floor of any comparison with these files.
import json, sys, urllib.request

url, out = sys.argv[1], sys.argv[2]
prompts = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea,",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three primary colors are",
    "Water boils at 100 degrees Celsius at sea level. At higher altitudes,",
    "The best way to learn a new language is",
    "In 1969, the Apollo 11 mission",
    "import numpy as np\n\ndef softmax(x):\n",
    "My favourite recipe for pancakes starts with",
    "The mitochondria is the powerhouse of the cell because",
    "Dear hiring manager, I am writing to apply for",
    "The quick brown fox jumps over the lazy dog. Then",
    "Photosynthesis converts sunlight into",
    "SELECT name, COUNT(*) FROM users",
    "The history of the Roman Empire can be divided into",
    "To install the package, run",
    "A haiku about autumn:\n",
    "Q: What is the tallest mountain in the world?\nA:",
    "The theory of relativity states that",
    "Here is a list of five fruits:\n1.",
    "fn main() {\n    let v = vec![1, 2, 3];\n",
    "The stock market fell sharply today as",
    "Machine learning models are trained by",
    "Le petit chat est",
    "The weather forecast for tomorrow predicts",
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
