#!/usr/bin/env bash
# Issue 22's GPU measurement as one prepared run for a lent H100/H200 (the `device` tool). Its three parts stop at
# 230 + 230 + 110 s, inside the device's 10-minute command limit; a part cut short keeps the rows it printed.
# Carry the wheels the machine's PyTorch lacks (smp, timm, albumentations ...: ../.library/device/README.md), then:
#   bash benchmarks/gpu_issue22.sh            # writes $OUT/grid_limit.txt (or ./grid_limit.txt)
# Rows: Linknet/ResNet34 and Unet/EfficientNet-b3 at the paper's 512 px, batch 2, 80 + 20 slices, before (default)
# and after (data on the device, compiled, bf16; six configurations stacked, eager and compiled), with the TFLOP/s,
# the fraction of the 989 TFLOP/s bf16 peak, seconds per configuration-epoch and the 600 x 200-epoch grid's projected
# GPU-hours; then a sample of the grid's encoders (Linknet, default vs six stacked).
set -uo pipefail
out=${OUT:-.}
log="$out/grid_limit.txt"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$log"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$log"
part() {  # part SECONDS ARGS...: one grid_limit.py run, its rows appended to the log
    local limit=$1; shift
    timeout "$limit" python3 benchmarks/grid_limit.py --device cuda --epochs 3 "$@" 2>&1 | grep -v Warning | tee -a "$log"
    [ "${PIPESTATUS[0]}" = 124 ] && echo "(stopped at its ${limit} s limit)" | tee -a "$log"
}
part 230 --archs linknet --encoders resnet34 --modes default,device_data,device_data+compile,device_data+compile+bf16 \
    --stack 6 --stack-compile
part 230 --archs unet --encoders efficientnet-b3 --modes default,device_data,device_data+compile,device_data+compile+bf16 \
    --stack 6 --stack-compile
part 110 --archs linknet --encoders vgg11,resnet18,resnet50,densenet121,mobilenet_v2,efficientnet-b0 --modes default --stack 6
