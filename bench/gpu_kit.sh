#!/usr/bin/env bash
# Wheels and a model config for a lent GPU machine (H100/H200, Python 3.12, torch 2.11 preinstalled, no network),
# then the GPU runs worth doing there. bench/README.md, "On a lent GPU machine", has the calls.
#
#   bash bench/gpu_kit.sh download        # here, with PyPI: .whl/ and .gpu_kit/smollm2-config/
#   bash bench/gpu_kit.sh install         # there: .whl/* into /tmp/site, neurolight editable, version checks
#   bash bench/gpu_kit.sh check [STEP..]  # there, after install: tests eigenscore sae sae-bf16 sae-compile
#                                         # sae-fastest sweep forward send-deepspeed lease
#
# The device tool runs a command for at most 10 minutes, so `check` runs the steps it is given; all of them take
# about 35 minutes, i.e. six calls. A session's lease is 15 minutes in all: `lease` is the one call that fits (it
# took 3.5 min on an H200, install included). Logs go to $OUT (the device sets it; at most 8 files come back).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

WHEELS=.whl
KIT=.gpu_kit
SITE=${GPU_KIT_SITE:-/tmp/site} # GPU_KIT_SITE: only to try `install` into a throwaway folder

# What the GPU image (KINDS.md, "Python packages already there") lacks for the tests, bench/sae_throughput.py with
# its SAELens side, bench/eigenscore.py and a SEND fit under DeepSpeed. Versions are .venv's.
MISSING=(
    jsonargparse docstring-parser typeshed-client # LightningCLI: jsonargparse[signatures]
    datasets dill multiprocess                    # the image has datasets' pyarrow, pandas, xxhash and fsspec
    deepspeed hjson pydantic pydantic-core annotated-types typing-inspection
    sae-lens transformer-lens better-abc simple-parsing
    # sae_lens/config.py imports wandb at module level (the benchmark keeps it off), and wandb imports these:
    wandb platformdirs googleapis-common-protos opentelemetry-api opentelemetry-sdk
    opentelemetry-semantic-conventions opentelemetry-proto opentelemetry-exporter-otlp-proto-http
    opentelemetry-exporter-otlp-proto-common opentelemetry-exporter-otlp-common opentelemetry-exporter-http-transport
    fanoutqa # the SEND demo's QA set (only its bundled JSON is read)
)
# In the image too, in another or an unread version: protobuf, because googleapis-common-protos (imported by wandb's
# opentelemetry) refuses a runtime older than 6.33.5. transformers is not carried: ours (5.25) needs
# huggingface-hub >= 2.4, which would bring httpx2 and more, and the image has hub 1.33; so the runs use the image's
# transformers 5.17 (pyproject asks >= 4.45, transformer-lens >= 5.9).
PINNED=(lightning protobuf)
# Required by carried packages but never imported on the paths above (pip installs with --no-deps): SAELens's
# plotting, text and env helpers and transformer-lens's type checkers. elasticsearch stays behind too: only
# callbacks/interpret/stores/elasticsearch.py imports it, lazily, and its tests need a noida-db server.
LEFT_BEHIND=(plotly plotly-express babe nltk python-dotenv tenacity beartype typeguard fancy-einsum
    transformers-stream-generator cwevals)

# Size: 31 MiB of wheels, 19 of them wandb (its Go service binary).

PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)

pip_here() { # .venv's pip, less the warnings about this workplace's configured local indexes that are absent
    .venv/bin/python -m pip "$@" 2> >(grep -v 'is neither a file nor a directory' >&2)
}

pins() { # NAME==VERSION of each named distribution, as installed in .venv
    .venv/bin/python -c 'import sys
from importlib.metadata import version
print("\n".join(f"{name}=={version(name)}" for name in sys.argv[1:]))' "$@"
}

download() {
    [[ -x .venv/bin/python ]] || { echo "no .venv here: run make venv first" >&2; exit 1; }
    mkdir -p .git/info
    touch .git/info/exclude
    local path
    for path in "/$WHEELS/" "/$KIT/"; do
        grep -qxF "$path" .git/info/exclude || echo "$path" >>.git/info/exclude
    done
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"

    local name platform platform_args=() specs=()
    for platform in "${PLATFORMS[@]}"; do platform_args+=(--platform "$platform"); done
    for name in "${MISSING[@]}" "${PINNED[@]}"; do [[ $name == deepspeed ]] || specs+=("$name"); done
    mapfile -t specs < <(pins "${specs[@]}")
    pip_here download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${platform_args[@]}" -d "$WHEELS" "${specs[@]}"

    # DeepSpeed is an sdist on PyPI. Built without ops (DS_BUILD_OPS=0, its default) it is pure Python,
    # py3-none-any, and compiles the ops it needs just in time on the GPU machine (nvcc and ninja are there).
    local sdist
    sdist=$(mktemp -d)
    pip_here download -q --no-deps --no-binary=:all: -d "$sdist" "$(pins deepspeed)"
    DS_BUILD_OPS=0 pip_here wheel -q --no-deps --no-build-isolation -w "$WHEELS" "$sdist"/deepspeed-*
    rm -rf "$sdist"
    ls "$WHEELS"/deepspeed-*-py3-none-any.whl >/dev/null ||
        { echo "deepspeed did not build into a py3-none-any wheel" >&2; exit 1; }

    # Config and tokenizer of SmolLM2-135M-Instruct, no weights: --model $KIT/smollm2-config --random-weights.
    local model
    model=$(.venv/bin/python -c 'from neurolight.datamodules.llm.models import embedded_model_dir; print(embedded_model_dir())')
    rm -rf "$KIT/smollm2-config" && mkdir -p "$KIT/smollm2-config"
    find "$model" -maxdepth 1 -type f \( -name '*.json' -o -name '*.jinja' \) ! -name neurolight_source.json \
        -exec cp {} "$KIT/smollm2-config/" \;

    ls -s --block-size=K "$WHEELS" "$KIT/smollm2-config"
    du -ch "$WHEELS" "$KIT" | tail -1
    echo "carry: [\"$WHEELS\", \"$KIT\"] (with the working tree, under 64 MiB)"
}

install() {
    PIP_ROOT_USER_ACTION=ignore python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --upgrade --target "$SITE" "$WHEELS"/*.whl
    # neurolight itself, editable, as make venv installs it here: pyproject.toml maps neurolight.callbacks to
    # callbacks/ and so on, which only its import finder knows (the repo's neurolight/ holds the namespace's
    # __init__ alone). No network: the image's setuptools builds it.
    PIP_ROOT_USER_ACTION=ignore PYTHONPATH=$SITE python3 -m pip install -q --no-index --no-deps --no-build-isolation \
        -e .
    export PYTHONPATH=$SITE
    local report=${OUT:-/tmp}/00_install.log
    mkdir -p "$(dirname "$report")"
    {
        python3 - <<'EOF'
import importlib
import importlib.metadata

for name in ("torch", "transformers", "lightning", "jsonargparse", "datasets", "deepspeed", "sae_lens", "neurolight"):
    try:
        module = importlib.import_module(name)
        version = getattr(module, "__version__", None) or importlib.metadata.version(name)
        print(f"{name:13s} {version:16s} {module.__file__}")
    except Exception as error:  # a missing wheel shows here by name; the others still print
        print(f"{name:13s} FAILED: {error!r}")
import torch

print("cuda available:", torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else "")
EOF
        # Unmet requirements of the carried packages, less those left behind on purpose (the image's own are
        # not shown): e.g. a version of the image's that a carried package does not accept.
        local carried left_behind
        carried=$(find "$WHEELS" -name '*.whl' -printf '%f\n' | cut -d- -f1 | sed 's/_/[-_]/g' | paste -sd'|')
        left_behind=$(printf '%s\n' "${LEFT_BEHIND[@]}" | paste -sd'|')
        python3 -m pip check 2>/dev/null | grep -iE "^($carried) " | grep -viE "requires ($left_behind)," || true
        echo "export PYTHONPATH=$SITE  # for commands of your own; check sets it itself"
    } 2>&1 | tee "$report"
}

# One run: a name for its log, a timeout in seconds, then the command; the output is also written to $OUT/NAME.log.
step() {
    local name=$1 limit=$2
    shift 2
    echo "=== $name (timeout ${limit}s): $*"
    local rc=0
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" || rc=$?
    echo "=== $name: exit $rc"
}

random_smollm2() { # CONFIG_DIR OUT_DIR: a seeded random-weight SmolLM2 saved with its tokenizer (no weights travel)
    python3 -c 'import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
torch.manual_seed(0)
AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1])).save_pretrained(sys.argv[2])
AutoTokenizer.from_pretrained(sys.argv[1]).save_pretrained(sys.argv[2])' "$1" "$2"
}

check() {
    [[ -d $SITE ]] || { echo "$SITE is missing: run bash bench/gpu_kit.sh install first" >&2; exit 1; }
    export PYTHONPATH=$SITE PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/gpu_kit_out}
    mkdir -p "$OUT"
    local model=$KIT/smollm2-config name steps=("$@")
    ((${#steps[@]})) || steps=(tests eigenscore sae sae-bf16 sae-compile sae-fastest sweep forward harvest send-deepspeed)
    for name in "${steps[@]}"; do
        case $name in
        # The fast tests, as CI runs them, less the browser tests (no Chromium there), the Elasticsearch store
        # tests (a noida-db server) and the SmolLM2 tests (real weights). The DeepSpeed tests run ZeRO on CPU
        # (tests/cpu_deepspeed.py), so DeepSpeed gets its CPU accelerator, as on a machine without a GPU.
        tests)
            DS_ACCELERATOR=cpu step 01_tests 360 python3 -m pytest -q -x -p no:cacheprovider \
                --ignore tests/interpret/test_feature_browser.py --ignore tests/interpret/test_latent_stores.py \
                --ignore tests/interpret/test_interpret_kill9.py --ignore tests/llm/test_smollm2.py
            ;;
        # No device option: this times the GPU machine's 16 CPU cores (76 s on 2 shared cores here).
        eigenscore)
            step 02_eigenscore 180 python3 bench/eigenscore.py --quick
            ;;
        # 6 runs of 524288 tokens (~20 s of training each at the 26k tokens/s an H100 gave in float32), model
        # loading, and the pydoc corpus built first (runs/ does not travel): ~5 min each.
        sae)
            step 03_sae_fp32 480 python3 bench/sae_throughput.py --device cuda --model "$model" --random-weights \
                --tokens 524288 --repeats 3 --json "$OUT/03_sae_fp32.json"
            ;;
        sae-bf16)
            step 04_sae_bf16 480 python3 bench/sae_throughput.py --device cuda --model "$model" --random-weights \
                --tokens 524288 --repeats 3 --llm-dtype bfloat16 --json "$OUT/04_sae_bf16.json"
            ;;
        # neurolight's truncated LLM forward compiled (CUDA graphs: the launch overhead that dominates a 135M model
        # at 16 x 64 tokens), bf16 LLM on both sides; the first steps include the compilation.
        sae-compile)
            step 06_sae_compile 540 python3 bench/sae_throughput.py --device cuda --model "$model" --random-weights \
                --tokens 1048576 --repeats 2 --llm-dtype bfloat16 --compile-llm --json "$OUT/06_sae_compile.json"
            ;;
        # Issue 13, item 1: each library with the same settings and with its fastest documented ones (neurolight bf16
        # LLM and buffer, compile_llm, bf16-mixed; SAELens bf16 LLM, autocast, autocast_lm, compile_llm, compile_sae),
        # at batch sizes a GPU user picks (64 x 64-token contexts a forward, 4096-token SAE steps); prints the forward's
        # share of the bf16 matmul ceiling too. 4 runs, each with its compilations: ~6 min (an estimate).
        sae-fastest)
            step 08_sae_fastest 500 python3 bench/sae_throughput.py --device cuda --model "$model" --random-weights \
                --settings same,fastest --tokens 262144 --batch-llm 64 --batch-sae 4096 --json "$OUT/08_sae_fastest.json"
            ;;
        # Issue 13, items 2 and 4: the 8-SAE sweep, neurolight's one run against SAELens sequential and its
        # MultiSAETrainingRunner, and every SAE's held-out EV and L0 (on random-weight activations: both sides alike).
        # Same settings (float32), GPU batch sizes; 8 sequential SAELens runs reload the model: ~5 min (an estimate).
        sweep)
            step 09_sweep 480 python3 bench/sae_sweep.py --device cuda --model "$model" --random-weights \
                --tokens 262144 --batch-llm 64 --batch-sae 4096 --json "$OUT/09_sweep.json"
            ;;
        # The truncated forward to layer 15 against the GPU's own bf16 matmul speed (issue 13: >= 60%): eager fp32,
        # eager bf16, compiled bf16 (CUDA graphs), batch 64 x 128 tokens as a GPU user would pick.
        forward)
            step 07_forward 300 python3 bench/forward_speed.py --device cuda --model "$model" --random-weights \
                --batch 64 --tokens 128 --repeats 50
            ;;
        # neurolight-harvest eager against compile_llm (CUDA graphs; a shard's last batch padded to the batch size, so
        # one graph), bf16 LLM, 64 contexts a forward, on random weights; the first shard (compilation) timed apart.
        harvest)
            random_smollm2 "$model" /tmp/smollm2-random
            step 13_harvest 300 python3 bench/cache_throughput.py --compare-harvest --device cuda \
                --model /tmp/smollm2-random --llm-dtype bfloat16 --batch-llm 64 --cache-tokens 262144 --repeats 2 \
                --json "$OUT/13_harvest.json"
            ;;
        # The SEND demo recipe under the DeepSpeed overlay (ZeRO-2, bf16-mixed) on random weights of SmolLM2's
        # shapes, since the real ones (a 94 MB GGUF) do not travel: whether it runs, and its epoch time.
        send-deepspeed)
            random_smollm2 "$model" /tmp/smollm2-random
            step 05_send_deepspeed 420 python3 -m neurolight fit --config configs/send/demo.yaml \
                --config configs/trainer/deepspeed.yaml \
                --model.init_args.model_name /tmp/smollm2-random --data.init_args.model_name /tmp/smollm2-random \
                --model.init_args.output_dir /tmp/send_deepspeed --trainer.default_root_dir /tmp/send_deepspeed \
                --trainer.logger.init_args.save_dir /tmp/send_deepspeed
            ;;
        # What one 15-minute device lease holds (one ~9-minute call after the machine's start): issue 13's two GPU
        # benches, shortened (item 1: same and fastest settings, with the forward's share of the bf16 matmul
        # ceiling; items 2 and 4: the sweep against MultiSAETrainingRunner), then the SEND recipe under DeepSpeed
        # ZeRO-2 and ZeRO-3 for a few steps each. Each part has its own timeout, so one overrun loses only itself.
        lease)
            step 10_sae_fastest 170 python3 bench/sae_throughput.py --device cuda --model "$model" --random-weights \
                --settings same,fastest --tokens 65536 --repeats 1 --batch-llm 64 --batch-sae 4096 \
                --json "$OUT/10_sae_fastest.json"
            step 11_sweep 200 python3 bench/sae_sweep.py --device cuda --model "$model" --random-weights \
                --sides neurolight,saelens-multi --tokens 131072 --batch-llm 64 --batch-sae 4096 \
                --json "$OUT/11_sweep.json"
            random_smollm2 "$model" /tmp/smollm2-random
            local stage
            for stage in 2 3; do
                step "12_send_zero$stage" 70 python3 -m neurolight fit --config configs/send/demo.yaml \
                    --config configs/trainer/deepspeed.yaml --trainer.strategy.init_args.stage "$stage" \
                    --trainer.max_epochs 1 --trainer.limit_train_batches 12 --trainer.limit_val_batches 2 \
                    --model.init_args.model_name /tmp/smollm2-random --data.init_args.model_name /tmp/smollm2-random \
                    --model.init_args.output_dir "/tmp/send_zero$stage" --trainer.default_root_dir "/tmp/send_zero$stage" \
                    --trainer.logger.init_args.save_dir "/tmp/send_zero$stage"
            done
            # The cached stream pins the batches it reads ahead only on CUDA (tests/sae/test_prefetch.py).
            step 13_prefetch_pinned 60 python3 -m pytest -q -p no:cacheprovider tests/sae/test_prefetch.py
            ;;
        # bench/interpret_throughput.py has no step: its explainer is SmolLM2 with its real weights (the 94 MB
        # GGUF, more than travels), whose explanations and generation lengths are what it measures, and without
        # runs/demo/interpret/samples it builds them from the demo SAE checkpoint. Random weights would time
        # another workload.
        *)
            echo "unknown step '$name'; steps: tests eigenscore sae sae-bf16 sae-compile sae-fastest sweep forward" \
                "send-deepspeed lease" >&2
            exit 2
            ;;
        esac
    done
}

case ${1:-} in
download) download ;;
install) install ;;
check) check "${@:2}" ;;
*)
    echo "usage: bash bench/gpu_kit.sh download | install | check [tests eigenscore sae sae-bf16 sae-compile" \
        "sae-fastest sweep forward send-deepspeed lease]" >&2
    exit 2
    ;;
esac
