#!/usr/bin/env bash
# On a networked machine: download the wheels an OFFLINE GPU host lacks, for scripts/gpu/gpu_check.sh.
#
#   bash scripts/gpu/fetch_wheels.sh [PYVER] [DEST] [--with-bitsandbytes]
#       PYVER  the GPU host's Python (default 3.12, CPython x86-64)
#       DEST   folder for the wheels (default .whl; keep it git-ignored: `.whl/` in .gitignore)
#
# What and why (the GPU image already has torch, triton, transformers, pytest, pytest-benchmark,
# pytest-xdist, hypothesis, matplotlib, numpy, pyyaml, requests, tqdm, typing-extensions):
#   nvtx                 fastrlhf's NVTX ranges (optional at import, wanted for profiling)
#   liger-kernel         the Liger-Kernel baseline of the benchmarks (deps: torch, triton only)
#   tyro + docstring-parser + typeguard    the trainer CLI (tyro's pure-python deps missing there)
#   gguf                 loading the embedded default model (deps numpy, pyyaml, requests, tqdm: there)
#   bitsandbytes         only with --with-bitsandbytes: ~40+ MB, and an offline GPU host takes at most
#                        64 MiB (wheels + working tree) per call
# Versions are pinned (one version of each: two versions of a package stop the whole offline install);
# override a pin with e.g. PIN_liger_kernel=0.8.6.
set -u

PYVER=3.12
DEST=.whl
BNB=0
POS=0
for arg in "$@"; do
  case "$arg" in
    --with-bitsandbytes) BNB=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    -*) echo "unknown option $arg" >&2; exit 2 ;;
    *)
      POS=$((POS + 1))
      if [ "$POS" = 1 ]; then PYVER=$arg; elif [ "$POS" = 2 ]; then DEST=$arg; else echo "too many arguments" >&2; exit 2; fi
      ;;
  esac
done
PY=${PYTHON:-python3}
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
mkdir -p "$DEST" || exit 2

# name -> pinned version (overridable as PIN_<name with - as _>)
pin() { local var="PIN_${1//-/_}"; echo "${!var:-$2}"; }
WANT=(
  "nvtx==$(pin nvtx 0.2.17)"
  "liger-kernel==$(pin liger-kernel 0.8.5)"
  "tyro==$(pin tyro 1.0.17)"
  "docstring-parser==$(pin docstring-parser 0.18.0)"
  "typeguard==$(pin typeguard 4.6.0)"
  "gguf==$(pin gguf 0.19.0)"
)
[ "$BNB" = 1 ] && WANT+=("bitsandbytes==$(pin bitsandbytes 0.50.2)")

# pip matches manylinux tags exactly: list the common glibc levels; pure-python (py3-none-any) wheels
# match any of them.
PLATFORMS=()
for p in manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 \
         manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  PLATFORMS+=(--platform "$p")
done

FAILED=()
for spec in "${WANT[@]}"; do
  name=${spec%%==*}
  norm=$(echo "$name" | tr '[:upper:]-' '[:lower:]_')
  rm -f "$DEST/$norm"-*.whl  # keep one version of each
  echo "== $spec"
  if ! "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      --python-version "$PYVER" --implementation cp "${PLATFORMS[@]}" -d "$DEST" "$spec"; then
    FAILED+=("$spec")
  fi
done

echo
ls -l "$DEST"/*.whl 2>/dev/null
TOTAL=$(du -cb "$DEST"/*.whl 2>/dev/null | tail -n 1 | cut -f1)
TOTAL=${TOTAL:-0}
echo "total: $((TOTAL / 1024 / 1024)) MiB in $DEST ($TOTAL bytes)"
if [ "$TOTAL" -gt $((56 * 1024 * 1024)) ]; then
  echo "WARNING: over 56 MiB: with the working tree this may exceed the GPU host's 64 MiB per call" >&2
fi
git check-ignore -q "$DEST/x.whl" 2>/dev/null
if [ $? = 1 ]; then  # 1: inside the repo and not ignored (128: outside the repo)
  echo "NOTE: $DEST/ is not git-ignored: add '$DEST/' to .gitignore (or .git/info/exclude) so wheels are never committed" >&2
fi
echo "next: carry it to the GPU host, beside the working tree, and run: bash scripts/gpu/gpu_check.sh \"\$OUT\""
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "FAILED: ${FAILED[*]}" >&2
  exit 1
fi
