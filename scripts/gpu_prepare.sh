#!/usr/bin/env bash
# On this (networked, CPU) machine, before a session's one call to the offline GPU host: fill what
# scripts/gpu_session.sh needs there, in two git-ignored folders the device tool carries.
#
#   bash scripts/gpu_prepare.sh
#       .whl/          the wheels the host lacks, bitsandbytes included (scripts/fetch_wheels.sh 3.12; ~46 MB)
#       .gpu/cfg135m/  the default model's config and tokenizer, no weights (~3.4 MB; the 98 MB GGUF cannot
#                      travel): from ~/.cache/fastrlhf/smollm2-135m-instruct/, which the test suite's
#                      default-model fixture creates (run `bash scripts/test.sh -k default_model` if absent)
# Then: run(command='FASTRLHF_GIT_COMMIT=<sha> bash scripts/gpu_session.sh "$OUT"', carry=[".whl", ".gpu"],
# timeout_s=580). The carry limit is 64 MiB for both folders and the working tree together.
set -eu
cd "$(dirname "$0")/.."
CACHE=${FASTRLHF_MODEL_CACHE:-$HOME/.cache/fastrlhf/smollm2-135m-instruct}
FILES="config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja"
for f in $FILES; do
  [ -f "$CACHE/$f" ] || { echo "gpu_prepare: $CACHE/$f missing (run the test suite once to unpack the model)" >&2; exit 1; }
done
bash scripts/fetch_wheels.sh 3.12 .whl --with-bitsandbytes
mkdir -p .gpu/cfg135m
for f in $FILES; do cp "$CACHE/$f" .gpu/cfg135m/; done
du -sh .whl .gpu
