"""How tight is the precision contract? The headroom of every output and gradient, from a logged test run.

    FASTRLHF_CONTRACT_LOG=/tmp/contract.jsonl bash scripts/test.sh -k contract
    python scripts/contract_report.py /tmp/contract.jsonl --markdown results/contract/headroom.md

tests/contract.py logs, per assertion, the largest share of the bound that any element's error used. The
table gives, per test file, output and input dtype, the smallest headroom over the test matrix: bound / error
at the element closest to its bound (1.0: at the bound; 10: the kernel's worst error is a tenth of what the
contract allows).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path


def label(what: str) -> str:
    """The output's name in an assertion's label: "random torch.bfloat16 grad hidden" -> "grad hidden"."""
    return re.search(r"(grad.*|output \d+|\S+)$", what).group(1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log", type=Path, help="the JSONL file FASTRLHF_CONTRACT_LOG named")
    ap.add_argument("--markdown", type=Path, help="also write the table here")
    args = ap.parse_args(argv)

    groups = collections.defaultdict(list)
    for line in args.log.read_text().splitlines():
        r = json.loads(line)
        dtype = re.search(r"torch\.(float32|bfloat16|float16)", r["test"])
        key = (
            r["test"].split("::")[0].removeprefix("tests/"),
            label(r["what"]),
            dtype.group(1) if dtype else r["dtype"],
        )
        groups[key].append(r["use_of_bound"])

    rows = ["| test file | output | input dtype | checks | headroom (min bound / error) |", "|---|---|---|---:|---:|"]
    for (file, output, dtype), uses in sorted(groups.items()):
        worst = max(uses)
        rows.append(f"| `{file}` | {output} | {dtype} | {len(uses)} | {1 / worst if worst else float('inf'):.1f} |")
    print("\n".join(rows))
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
