"""Candidates from saved replies: first K samples per prompt, all pairs or disjoint."""
import json, sys, itertools
from fastrlhf.trainer.annotate import make_candidate, pair_responses
from fastrlhf.trainer.data import load_demo_prompts, write_jsonl
K, mode, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
replies = json.load(open("/tmp/exp/replies4.json"))
rows = []
meta = {"model": "default", "temperature": 0.7, "seed": 7, "samples_per_prompt": K, "max_new_tokens": 24}
for rec, texts in zip(load_demo_prompts(), replies):
    texts = texts[:K]
    if mode == "all":
        distinct = list(dict.fromkeys(t for t in texts if t.strip()))
        pairs = list(itertools.combinations(distinct, 2))
    else:
        pairs = pair_responses(texts)[0]
    rows += [make_candidate(rec, a, b, meta) for a, b in pairs]
write_jsonl(out, rows)
print(len(rows))
