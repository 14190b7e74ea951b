#!/usr/bin/env bash
# Builds .gpu/ (ignored by git), the one folder a call of the device tool carries for benchmarks/gpu_check.py:
#   .gpu/wheels/   the packages the card's Python 3.12 lacks (pydantic and what it needs), manylinux x86_64
#                  wheels of the versions .venv has
#   .gpu/samples/  the real sample photos gpu_check reads (gpu_check.py --list-samples), in the same layout
#                  as ../shared/carvana_samples (train_512/, test_fullres/); they stay out of the repository
# then prints the device call: its command and its carry.
#
#   benchmarks/gpu_prepare.sh [SAMPLES]      SAMPLES: default ../shared/carvana_samples
#   benchmarks/gpu_prepare.sh --print        the call alone, nothing built
set -euo pipefail
cd "$(dirname "$0")/.."

print_call() {
    cat <<'CALL'

The device call (the device tool's run), with carry [".gpu"] and timeout_s 600:

set -o pipefail; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .gpu/wheels/*.whl && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 && python3 benchmarks/gpu_check.py --samples .gpu/samples --out $OUT/gpu_check.json --budget 420 2>&1 | tee $OUT/gpu_check.log

--budget 420: no part starts or runs past 420 s (each part also stops at its own limit), so the call's
600 s leave the pip install, the start and the JSON's way back. One part alone: add --only NAME[,NAME]
(parts, or checks / speed / compile / all); train_compiled runs only when named.
CALL
}

if [ "${1:-}" = "--print" ]; then
    print_call
    exit 0
fi
samples=${1:-../shared/carvana_samples}
py=.venv/bin/python
packages="pydantic pydantic-core annotated-types typing-inspection typing-extensions"

rm -rf .gpu
mkdir -p .gpu/wheels .gpu/samples
pins=$($py -c "import sys; from importlib.metadata import version; print(' '.join(f'{n}=={version(n)}' for n in sys.argv[1:]))" $packages)
.venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d .gpu/wheels $pins
root=$PWD
$py benchmarks/gpu_check.py --list-samples --samples "$samples" | (cd "$samples" && xargs cp --parents -t "$root/.gpu/samples")

kib=$(du -sk .gpu | cut -f1)
echo "built .gpu: $(ls .gpu/wheels | wc -l) wheels ($pins), $(find .gpu/samples -type f | wc -l) sample files, $(( (kib + 512) / 1024 )) MiB"
if [ "$kib" -gt $((16 * 1024)) ]; then
    echo "warning: .gpu is over 16 MiB; the device call carries it with the working tree (64 MiB at most)" >&2
fi
print_call
