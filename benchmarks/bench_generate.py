"""Sampling benchmark: HF `generate` (dynamic cache), HF `generate` with a static cache (+ compile on CUDA),
and fastrlhf's sampler (trainer/generate.py), on the same random-init model and prompts.

    python benchmarks/bench_generate.py --out out/generate                            # demo shape, 135M
    python benchmarks/bench_generate.py --arch llama-3.2-1b --prompts 32 --max-new-tokens 256 --out "$OUT"
    python benchmarks/bench_generate.py --smoke --out /tmp/g                           # CI: seconds

Modes (`--modes`):
- hf-dynamic: `model.generate(do_sample=True, temperature=T, top_k=0, top_p=1, num_return_sequences=k)`,
  the trainer's sampling before the sampler existed.
- hf-static: the same with `cache_implementation="static"`; on CUDA transformers then compiles the forward
  (`torch.compile(mode="reduce-overhead")`, its default CompileConfig); off CUDA it does not compile.
- ours: `fastrlhf.trainer.generate.generate` (each prompt prefilled once, device-side sampling, the
  behaviour log-probs); on CUDA with `compile=True` (the decode step as a CUDA graph).

What is measured, per mode and repetition (modes interleaved in each repetition, so a busy machine's load
hits all of them alike; the report gives medians and each repetition's ratio to hf-dynamic):
- tokens/s: decoded tokens (rows x reply columns returned) / wall seconds of one call, after a warm-up call
  (compilation, allocator) that is not timed.
- ttft_s: time to first token, measured as a call with max_new_tokens=1 (the prefill and one draw).
- peak_mb: CUDA `max_memory_allocated` during the call (reset first; the model's weights included); None
  on CPU (the process's RSS high-water mark is not per call).
A random-init model rarely samples EOS, so replies run to --max-new-tokens and all modes decode the same
number of tokens.

Prompts: --prompts random token sequences of lengths drawn in [--prompt-min, --prompt-max] (default 24-48,
around the demo's ~37 chat-rendered tokens), left-padded, --samples replies each.

Output in --out: generate.json (environment, arguments, per-mode per-repetition raw timings, medians,
ratios) and generate.md (the table, also printed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import measure  # noqa: E402

FILES = ("generate.json", "generate.md")
MODES = ("hf-dynamic", "hf-static", "ours")
ARCHS = measure.ARCHS  # random-init model configurations
EOS, PAD = 2, 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="benchmarks/bench_generate.py",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--arch", choices=tuple(ARCHS), default="smollm2-135m", help="model shapes (random init)")
    p.add_argument("--prompts", type=int, default=64, help="prompts per call")
    p.add_argument("--samples", type=int, default=2, help="replies per prompt")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--prompt-min", type=int, default=24)
    p.add_argument("--prompt-max", type=int, default=48)
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--repeats", type=int, default=3, help="timed calls per mode (modes interleaved)")
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES))
    p.add_argument(
        "--dtype",
        choices=("auto", "float32", "bfloat16"),
        default="auto",
        help="model dtype: auto = bf16 on CUDA, fp32 on CPU",
    )
    p.add_argument("--device", default="auto", help='"auto" (CUDA if available), "cuda" or "cpu"')
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--smoke", action="store_true", help="tiny model, 4 prompts, 4 tokens, 1 repetition (seconds)")
    p.add_argument("--out", default="out/generate", help="results folder (" + ", ".join(FILES) + ")")
    args = p.parse_args(argv)
    if args.smoke:
        args.arch, args.prompts, args.max_new_tokens, args.repeats = "tiny", 4, 4, 1
        args.prompt_min, args.prompt_max = 3, 8
    return args


def build_model(arch: str, dtype: torch.dtype, device: torch.device, seed: int):
    import transformers

    cls, kw = ARCHS[arch]
    config = getattr(transformers, cls)(**kw, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config = transformers.GenerationConfig(bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    return model.to(device).eval()


def make_prompts(args, vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    from fastrlhf.trainer.rollout import left_pad

    g = torch.Generator().manual_seed(args.seed)
    lengths = torch.randint(args.prompt_min, args.prompt_max + 1, (args.prompts,), generator=g).tolist()
    rows = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]
    ids, mask = left_pad(rows, PAD)
    return ids.to(device), mask.to(device)


def call(mode: str, model, ids, mask, args, max_new_tokens: int) -> int:
    """One sampling call -> tokens decoded (rows x reply columns)."""
    if mode == "ours":
        from fastrlhf.trainer.generate import generate

        out = generate(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            temperature=args.temperature,
            stop_ids=[EOS],
            pad_id=PAD,
            samples_per_prompt=args.samples,
            compile=True,
        )
        return out.tokens.numel()
    extra = {"cache_implementation": "static"} if mode == "hf-static" else {}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=args.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_new_tokens,
        num_return_sequences=args.samples,
        eos_token_id=[EOS],
        pad_token_id=PAD,
        **extra,
    )
    return out[:, ids.shape[1] :].numel()


def timed(fn, device: torch.device) -> tuple[float, int, float | None]:
    """(seconds, fn's return value, peak MB or None)."""
    if measure.on_cuda(device):
        torch.cuda.reset_peak_memory_stats(device)
    measure.sync(device)
    t0 = time.perf_counter()
    n = fn()
    measure.sync(device)
    s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if measure.on_cuda(device) else None
    return s, n, peak


def run(args) -> dict:
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(args.dtype)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    env = measure.environment(device)  # before the runs: the commit whose code is measured
    modes = [m for m in args.modes.split(",") if m]
    assert set(modes) <= set(MODES), f"unknown mode in {modes}"
    model = build_model(args.arch, dtype, device, args.seed)
    ids, mask = make_prompts(args, model.config.vocab_size, device)
    raw: dict[str, list[dict]] = {m: [] for m in modes}
    with torch.no_grad():
        for m in modes:  # warm-up: compilation, CUDA graphs, allocator
            torch.manual_seed(args.seed)
            call(m, model, ids, mask, args, args.max_new_tokens)
            call(m, model, ids, mask, args, 1)
        for r in range(args.repeats):
            for m in modes:
                torch.manual_seed(args.seed + r)
                s, n, peak = timed(lambda: call(m, model, ids, mask, args, args.max_new_tokens), device)
                ttft, _, _ = timed(lambda: call(m, model, ids, mask, args, 1), device)
                raw[m].append({"seconds": s, "tokens": n, "tokens_per_s": n / s, "ttft_s": ttft, "peak_mb": peak})
    summary = {}
    for m in modes:
        rs = raw[m]
        peaks = [x["peak_mb"] for x in rs if x["peak_mb"] is not None]
        summary[m] = {
            "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs),
            "ttft_s": statistics.median(x["ttft_s"] for x in rs),
            "peak_mb": max(peaks) if peaks else None,
            "tokens": rs[0]["tokens"],
        }
    ratios = {}
    if "hf-dynamic" in modes:
        for m in modes:
            per_rep = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(raw[m], raw["hf-dynamic"])]
            ratios[m] = {"per_repeat": per_rep, "median": statistics.median(per_rep)}
    if "ours" in modes and "hf-static" in modes:
        per_rep = [a["tokens_per_s"] / b["tokens_per_s"] for a, b in zip(raw["ours"], raw["hf-static"])]
        ratios["ours_vs_hf-static"] = {"per_repeat": per_rep, "median": statistics.median(per_rep)}
    return {
        "environment": env,
        "args": {k: v for k, v in vars(args).items() if k != "out"},
        "dtype": str(dtype).replace("torch.", ""),
        "compiled": {"hf-static": device.type == "cuda", "ours": device.type == "cuda"},
        "shape": {"rows": args.prompts * args.samples, "prompt_width": ids.shape[1]},
        "raw": raw,
        "summary": summary,
        "tokens_per_s_ratio_vs_hf_dynamic": ratios,
    }


def markdown(doc: dict) -> str:
    a, env = doc["args"], doc["environment"]
    head = (
        f"Sampling, {a['arch']} (random init, {doc['dtype']}), {a['prompts']} prompts x {a['samples']} samples, "
        f"{a['max_new_tokens']} new tokens, prompt width {doc['shape']['prompt_width']}, on "
        f"{env['gpu_name'] or 'CPU'} ({env['git_commit']}); medians of {a['repeats']} repetitions"
    )
    lines = [head, "", "| mode | tokens/s | x hf-dynamic | ttft s | peak MB |", "|---|---:|---:|---:|---:|"]
    for m, s in doc["summary"].items():
        r = doc["tokens_per_s_ratio_vs_hf_dynamic"].get(m, {}).get("median")
        peak = "-" if s["peak_mb"] is None else f"{s['peak_mb']:.0f}"
        lines.append(
            f"| {m} | {s['tokens_per_s']:.1f} | {'-' if r is None else f'{r:.2f}'} | {s['ttft_s']:.3f} | {peak} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    doc = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "generate.json").write_text(json.dumps(measure.json_safe(doc), indent=1) + "\n")
    md = markdown(doc)
    (out / "generate.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
