#!/usr/bin/env bash
# Check a GPU node end to end and keep what it printed: `batch-infer gpu-check` with the bundled
# digits CNN (the seed table's model), then with ResNet-50 on seeded weights (no download: a model
# with a GPU's worth of work, ~4 GFLOPs per image); MODELS=clip adds CLIP ViT-B/32 (a transformer,
# seeded likewise). Each writes MODEL.txt and MODEL.json in OUT_DIR.
#
#   tools/gpu_check_node.sh [OUT_DIR]          (default: gpu-check-out; from any directory)
#
# Environment: MODELS (default "digits resnet50"), GPU_CHECK_ARGS (e.g. --quick), SECONDS_EACH
# (each check's time limit, default 300: one that hangs still leaves the others' results), and
# WHEELS, a folder of wheels a node without network lacks (Ray and jsonschema, for Python 3.12),
# installed under /tmp/site, nothing system-wide. The checkout is used in place (no pip install).
set -uo pipefail
out=$(realpath -m "${1:-gpu-check-out}")
cd "$(dirname "$0")/.."
mkdir -p "$out"
if [ -n "${WHEELS:-}" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$WHEELS"/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-} PYTHONUNBUFFERED=1
{ nvidia-smi -L; python3 -c "import jax, jaxlib; print('jax', jax.__version__, jaxlib.__version__)"
} > "$out/node.txt" 2>&1

models=${MODELS:-digits resnet50}
for model in $models; do
    case $model in
        digits|resnet50|clip) ;;
        *) echo "unknown model '$model' (digits, resnet50, clip)" >&2; exit 2 ;;
    esac
done
status=0
tests=()  # 'pytest -m gpu' checks the node, not the model: with the first model only
for model in $models; do
    # Images, outputs and weights go outside OUT_DIR: only the reports are to be kept.
    work=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check-$model-XXXXXX")
    case $model in
        digits) args=() ;;
        resnet50)
            weights=$work/resnet50-seeded.safetensors  # 100 MB
            python3 -c "import sys; sys.path.insert(0, 'tests')
from reference.resnet_weights import write_checkpoint
write_checkpoint(sys.argv[1])" "$weights" || exit 1
            args=(--model-fn pipeline.models.resnet:build --model "$weights") ;;
        clip)
            python3 -c "import sys; sys.path.insert(0, 'tests')
from reference.vit_weights import write_snapshot
write_snapshot(sys.argv[1])" "$work/clip-vit-b-32" || exit 1  # 350 MB
            args=(--model-fn pipeline.models.clip:build --model "$work/clip-vit-b-32") ;;
    esac
    # shellcheck disable=SC2086  # GPU_CHECK_ARGS is a list of flags
    timeout "${SECONDS_EACH:-300}" python3 -m pipeline.cli gpu-check --json "$out/$model.json" \
        --work "$work" "${args[@]}" "${tests[@]}" ${GPU_CHECK_ARGS:-} > "$out/$model.txt" 2>&1
    code=$?
    tests=(--skip-tests)
    echo "$model: exit $code, report in $out/$model.txt"
    rm -rf "$work"
    [ $code -eq 0 ] || status=1
done
exit $status
