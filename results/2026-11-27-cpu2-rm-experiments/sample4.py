"""Sample 4 replies per demo prompt (as the pipeline does, T=0.7, 24 tokens) and save them all."""
import json, time
from fastrlhf.trainer import models
from fastrlhf.trainer.annotate import _sample_responses
from fastrlhf.trainer.data import load_demo_prompts
path = models.resolve_model_path("default")
tok = models.load_tokenizer(path, padding_side="left")
model = models.load_causal_lm(path, device="cpu", tokenizer=tok)
recs = load_demo_prompts()
t = time.time()
replies, unf = _sample_responses(model, tok, recs, samples_per_prompt=4, temperature=0.7, max_new_tokens=24, batch_size=64, seed=7, device="cpu")
print("time", time.time() - t, "unfinished", unf)
json.dump(replies, open("/tmp/exp/replies4.json", "w"))
