"""`fastrlhf pipeline` under torchrun for tests/test_distributed.py: `python tests/pipeline_worker.py CONFIG.json`
(PipelineConfig fields), with tests/test_pipeline.py's rubric for random text registered on every rank."""

from __future__ import annotations

import json
import sys

from fastrlhf.trainer import rubric
from fastrlhf.trainer.config import PipelineConfig
from fastrlhf.trainer.pipeline import run_pipeline


def shorter_is_better(record, response: str) -> float:
    """A tiny random model's replies are ties under the demo rubric; this one ranks any two of them."""
    return -0.1 * len(response.split())


if __name__ == "__main__":
    rubric.RUBRICS["shorter"] = shorter_is_better
    cfg = json.loads(open(sys.argv[1]).read())
    run_pipeline(PipelineConfig(**{**cfg, "split": tuple(cfg["split"])}))
