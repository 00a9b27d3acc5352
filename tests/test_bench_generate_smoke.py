"""benchmarks/bench_generate.py works end to end on a CPU in its --smoke mode (seconds): the three modes
run on the same prompts, decode the same number of tokens (so the tokens/s compare like with like), and
write the JSON and markdown the GPU check merges. No GPU number is produced or checked here: on CPU the
peak-memory column must be empty and nothing is compiled."""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_generate  # noqa: E402


def test_bench_generate_smoke(tmp_path, capsys):
    assert bench_generate.main(["--smoke", "--device", "cpu", "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(bench_generate.FILES)
    doc = json.loads((tmp_path / "generate.json").read_text())
    assert set(doc["summary"]) == set(bench_generate.MODES)
    tokens = {m: s["tokens"] for m, s in doc["summary"].items()}
    assert set(tokens.values()) == {4 * 2 * 4}, tokens  # 4 prompts x 2 samples x 4 tokens, every mode
    for m, s in doc["summary"].items():
        assert s["tokens_per_s"] > 0 and s["ttft_s"] > 0 and s["peak_mb"] is None, (m, s)
    assert doc["compiled"] == {"hf-static": False, "ours": False}
    ratios = doc["tokens_per_s_ratio_vs_hf_dynamic"]
    assert ratios["hf-dynamic"]["median"] == 1.0 and len(ratios["ours"]["per_repeat"]) == 1
    assert doc["environment"]["git_commit"]
    out = capsys.readouterr().out
    assert "| ours |" in out and "| hf-static |" in out
