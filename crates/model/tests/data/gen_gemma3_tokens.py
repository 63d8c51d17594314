# Regenerates gemma3_tokens.json: the ids llama.cpp's llama-tokenize gives for a
# test corpus (without and with special-token parsing, no BOS), for
# crates/model/tests/gemma3.rs. Usage: python3 gen_gemma3_tokens.py MODEL.gguf OUT.json
# (build llama-tokenize with ../shared/tools/build-llamacpp.sh; adjust `bin`).
import json, subprocess, os, sys
bin='/tmp/llamacpp/llama.cpp/build/bin/llama-tokenize'
env=dict(os.environ, LD_LIBRARY_PATH='/tmp/llamacpp/llama.cpp/build/bin')
model=sys.argv[1]
texts = [
 "Hello", "Hello world", " Hello world", "Hello  world", "  leading and trailing  ",
 "The quick brown fox jumps over the lazy dog.",
 "def fib(n):\n    if n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
 "for (int i = 0; i < 10; ++i) { printf(\"%d\\n\", i); }",
 "\t\tindented\twith tabs\n\n\nthree newlines",
 "Numbers: 0 1 12 123 1234 12345 3.14159 -42 1e10 2026-12-03",
 "Café, naïve, résumé, Zürich, São Paulo, Ångström",
 "日本語のテキストと中文文本，还有한국어.",
 "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷",
 "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
 "<bos>text with <eos> markup and <pad> and <unused0>",
 "HTML: <table><tr><td>cell</td></tr></table> <b>bold</b>",
 "Mixed     spaces      and\n\n\n\n\nnewlines\r\nwindows",
 "unknown bytes: \u0001\u0002 and \u00ad soft hyphen and \ufeff bom",
 "a", " ", "\n", "",
 "supercalifragilisticexpialidocious antidisestablishmentarianism",
 "Ελληνικά и русский текст, עברית, العربية",
 "{\"tool_calls\": [{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}]}",
]
out=[]
for t in texts:
    rec={"text": t}
    for key, flags in (("literal", ["--no-parse-special"]), ("special", [])):
        open('in.txt','w').write(t)
        r=subprocess.run([bin,'-m',model,'-f','in.txt','--ids','--no-bos','--log-disable','--no-escape']+flags, capture_output=True, text=True, env=env)
        line=[l for l in r.stdout.splitlines() if l.startswith('[')]
        if r.returncode!=0 or not line:
            print("FAIL", repr(t), r.stderr[-500:]); sys.exit(1)
        rec[key]=json.loads(line[-1])
    out.append(rec)
json.dump(out, open(sys.argv[2],'w'), ensure_ascii=False, indent=0)
print(len(out))
