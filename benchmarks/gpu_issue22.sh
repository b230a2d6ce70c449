#!/usr/bin/env bash
# Issue 22's GPU measurement as one prepared run for a lent H100/H200 (the `device` tool; about 10 minutes).
# Carry the wheels its PyTorch lacks (smp, timm, albumentations ...: see ../.library/device/README.md), then:
#   bash benchmarks/gpu_issue22.sh            # writes $OUT/grid_limit.txt (or ./grid_limit.txt)
# Rows: Linknet/ResNet34 and Unet/EfficientNet-b3 at the paper's 512 px, batch 2, 80 + 20 slices, before (default)
# and after (data on the device, compiled, bf16; stacked K = 2 and 6), with the TFLOP/s, the fraction of the
# 989 TFLOP/s bf16 peak, seconds per configuration-epoch and the 600 x 200-epoch grid's projected GPU-hours; then a
# sample of the grid's encoders (Linknet, default vs stacked K = 6).
set -euo pipefail
out=${OUT:-.}
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/grid_limit.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.version.cuda)" | tee -a "$out/grid_limit.txt"
timeout 330 python3 benchmarks/grid_limit.py --device cuda --archs linknet,unet --encoders resnet34,efficientnet-b3 \
    --modes default,device_data,device_data+compile,device_data+compile+bf16 --stack 2,6 --epochs 3 2>&1 \
    | grep -v Warning | tee -a "$out/grid_limit.txt" || echo "(stopped at its time limit)" | tee -a "$out/grid_limit.txt"
timeout 200 python3 benchmarks/grid_limit.py --device cuda --archs linknet \
    --encoders vgg11,resnet18,resnet50,densenet121,mobilenet_v2,efficientnet-b0 --modes default --stack 6 --epochs 3 2>&1 \
    | grep -v Warning | tee -a "$out/grid_limit.txt" || echo "(stopped at its time limit)" | tee -a "$out/grid_limit.txt"
