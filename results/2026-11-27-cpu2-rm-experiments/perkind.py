import json, sys, collections, torch
from fastrlhf.trainer import rubric as R, models
from fastrlhf.trainer.reward import score_pairs
from fastrlhf.trainer.data import load_pairs
d = sys.argv[1]
tok = models.load_tokenizer(d + "/step2_reward/model", padding_side="right")
m = models.load_reward_model(d + "/step2_reward/model", device=torch.device("cpu"), tokenizer=tok)
for split in ("val", "test", "train"):
    pairs = load_pairs(f"{d}/step2_reward/splits/{split}.jsonl")
    raw = [json.loads(l) for l in open(f"{d}/step2_reward/splits/{split}.jsonl")]
    s = score_pairs(m, tok, pairs, batch_pairs=32, max_length=96, device=torch.device("cpu"))
    c = collections.defaultdict(lambda: [0, 0])
    for i, k in enumerate(s["kept"]):
        r = raw[k]; a, b = r["chosen"], r["rejected"]
        kind = 'garbage' if (R.garbage_reason(a) is None) != (R.garbage_reason(b) is None) else 'correct' if R.is_correct(r, a) != R.is_correct(r, b) else 'finish' if (R.brevity(a) > 0) != (R.brevity(b) > 0) else 'length'
        c[kind][0] += s["chosen"][i] > s["rejected"][i]; c[kind][1] += 1
        if split != "train" and s["chosen"][i] <= s["rejected"][i]: print(split, kind, "| C:", a[-70:].replace("\n"," "), "| R:", b[-70:].replace("\n"," "))
    print(split, {k: f"{v[0]}/{v[1]}" for k, v in c.items()})
