#!/usr/bin/env bash
# On a networked (CPU) machine, before one call to an offline GPU host: fill what scripts/gpu/gpu_session.sh
# needs there, in two git-ignored folders that travel with the working tree.
#
#   bash scripts/gpu/gpu_prepare.sh
#       .whl/          the wheels the host lacks, bitsandbytes included (scripts/gpu/fetch_wheels.sh 3.12; ~46 MB)
#       .gpu/cfg135m/  the default model's config and tokenizer, no weights (~3.4 MB; the 98 MB GGUF cannot
#                      travel): from ~/.cache/fastrlhf/smollm2-135m-instruct/, unpacked here first if absent
#                      (the project's environment, scripts/setup_env.sh, then `default_model_path()`: ~3 min
#                      in a fresh checkout)
# Then, on the GPU host with both folders beside the tree: FASTRLHF_GIT_COMMIT=<sha> bash scripts/gpu/gpu_session.sh OUT
# (590 s limit). The host takes at most 64 MiB for both folders and the working tree together.
set -eu
cd "$(dirname "$0")/../.."
XDG=${XDG_CACHE_HOME:-}
[ "${XDG#/}" != "$XDG" ] || XDG=$HOME/.cache  # as trainer/models.py: an unset or relative XDG_CACHE_HOME is ~/.cache
CACHE=${FASTRLHF_MODEL_CACHE:-$XDG/fastrlhf/smollm2-135m-instruct}
FILES="config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja"
missing() { for f in $FILES; do [ -f "$CACHE/$f" ] || { echo "$f"; return; }; done; }
if [ -n "$(missing)" ]; then
  echo "gpu_prepare: $CACHE/$(missing) missing: unpacking the default model" >&2
  source scripts/setup_env.sh
  "$PY" -c "from fastrlhf.trainer.models import default_model_path; print(default_model_path())"
  [ -z "$(missing)" ] || { echo "gpu_prepare: $CACHE/$(missing) still missing" >&2; exit 1; }
fi
bash scripts/gpu/fetch_wheels.sh 3.12 .whl --with-bitsandbytes
mkdir -p .gpu/cfg135m
for f in $FILES; do cp "$CACHE/$f" .gpu/cfg135m/; done
du -sh .whl .gpu
