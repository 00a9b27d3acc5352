"""Experiment: annotate existing candidates with a given tie tolerance, train the RM as the pipeline does."""
import json, shutil, sys, time, collections, logging
from pathlib import Path
import numpy as np
logging.basicConfig(level=logging.WARNING)
from fastrlhf.trainer import rubric as R
from fastrlhf.trainer import pipeline as P

cand, tol, out = sys.argv[1], float(sys.argv[2]), Path(sys.argv[3])
extra = dict(a.split("=") for a in sys.argv[4:])
R.TIE_TOLERANCE = tol
d = R.prefer.__defaults__
R.prefer.__kwdefaults__["tolerance"] = tol
if out.exists(): shutil.rmtree(out)
(out / "step1").mkdir(parents=True)
shutil.copy(cand, out / "step1" / "candidates.jsonl")
from fastrlhf.trainer.config import PipelineConfig
cfg = PipelineConfig(out_dir=str(out), ppo=False, **{k: type(getattr(PipelineConfig, k))(v) for k, v in extra.items()})
t = time.time()
m = P.run_pipeline(cfg)
rm = m["reward_model"]
print("TIME", time.time() - t, m["timings"])
for s in ("val", "test"):
    print(s, rm[s]["pairs"], "acc %.3f auc %.3f" % (rm[s]["accuracy"], rm[s]["auc_roc"]))
