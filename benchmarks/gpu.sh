#!/usr/bin/env bash
# The GPU rows of docs/performance.md in one go (about 8 minutes on one H100, random-init VGG-19s: no
# ImageNet weights are needed for timing). Each step writes its JSON as soon as it ends, so a run cut
# short keeps what it finished. Run from the repository root:
#
#     bash benchmarks/gpu.sh OUT_DIR          # python: $PYTHON, else python3; racnn from ./src
#
#   1. the CUDA tests (training step free of host-device syncs), the fast-path and model tests, and the
#      quick demo trained on the GPU under autocast
#   2. the ratios of issue 4: 3 x VGG-19 at 448, batch 8, bf16, channels_last; crop 16 x 448 -> 224
#   3. the paper's configuration: 448 then 224 (--zoom-size), batch 16, bf16: images per second, memory
#   4. three VGG-19s at 448 on every scale, batch 16: peak memory with and without activation checkpointing
#   5. the shipped MobileNetV2 config at 224, batch 16, on the GPU
#   6. the compiled crop (runtime.compile_crop): the crop alone, and in the step of step 2
set -u -o pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
speed=(benchmarks/speed.py --device cuda --precision bf16 --channels-last --data '')
vgg=(--backbone vgg19 --input-size 448)
status=0
step() {  # step NAME COMMAND...: run, log to OUT/NAME.log, remember a failure and go on
    local name=$1
    shift
    echo "== $name: $*"
    local t0=$SECONDS
    "$@" 2>&1 | tee "$out/$name.log" | tail -n 25 || { status=1; echo "!! $name failed"; }
    echo "== $name: $((SECONDS - t0)) s"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
$py -c 'import torch, torchvision; print("torch", torch.__version__, "torchvision", torchvision.__version__)'
step tests $py -m pytest -q -p no:cacheprovider tests/test_fast_paths.py tests/test_model.py
step demo_cuda_amp $py -m racnn demo --quick --no-progress --out "$out/demo" --set runtime.device=cuda runtime.amp=true
step ratios_vgg19_448_b8 $py "${speed[@]}" "${vgg[@]}" --batch-size 8 --warmup 3 --iters 15 \
    --crop-iters 15 --json "$out/speed_gpu_vgg19_448_b8.json"
step paper_448_224_b16 $py "${speed[@]}" "${vgg[@]}" --zoom-size 224 --batch-size 16 --warmup 3 \
    --iters 15 --skip crop --json "$out/speed_gpu_paper_b16.json"
step memory_448_b16_ckpt $py "${speed[@]}" "${vgg[@]}" --batch-size 16 --checkpoint-activations \
    --warmup 2 --iters 5 --skip infer,crop --json "$out/speed_gpu_vgg19_448_b16_ckpt.json"
step memory_448_b16 $py "${speed[@]}" "${vgg[@]}" --batch-size 16 --skip train,infer,crop \
    --json "$out/speed_gpu_vgg19_448_b16_memory.json"
step mobilenet_v2_224_b16 $py "${speed[@]}" --config configs/cub_mobilenet_v2_cpu.yaml \
    --set model.pretrained=false --warmup 3 --iters 15 --skip memory,crop --json "$out/speed_gpu_mnv2_224_b16.json"
step crop_compiled $py benchmarks/speed.py --device cuda --data '' --compile-crop \
    --skip train,infer,memory,loader --crop-iters 25 --json "$out/speed_gpu_crop_compiled.json"
step ratios_vgg19_448_b8_compiled_crop $py "${speed[@]}" "${vgg[@]}" --batch-size 8 --compile-crop \
    --warmup 3 --iters 15 --skip crop,memory --json "$out/speed_gpu_vgg19_448_b8_compiled_crop.json"
exit $status
