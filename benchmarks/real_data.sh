#!/usr/bin/env bash
# Issue 3's measurements on ../shared: both papers' presets and stronger honest configs, with the offline
# ImageNet weights in ../shared/weights standing in for ResNet50/VGG19/MobileNet-v1 (unavailable offline),
# then the trained models on the external sets. Usage: bash benchmarks/real_data.sh [OUT] (about 2 hours on 2 cores).
set -euo pipefail
S=${COVIDSCAN_SHARED:-$(cd "$(dirname "$0")/../.." && pwd)/shared}
OUT=${1:-runs/real}
MNV2=$S/weights/mobilenet_v2_imagenet_coral_dequant.pth
LITE0=$S/weights/tf_efficientnet_lite0_imagenet.pth
CT=$S/data/ucsd-ct/labels.csv
CXR=$S/data/cxr-dev/metadata.csv
cs() { echo "+ covidscan $*"; covidscan -q "$@"; }

# Paper A on ucsd-ct: every row, published protocol and patient-level (official split), MobileNetV2 for ResNet50.
cs reproduce paper-a --data "$CT" --out "$OUT/paper-a" --set model.backbone=mobilenet_v2 --set "model.weights=$MNV2"
# Paper B on cxr-dev: every row; EfficientNet-Lite0 stands in for VGG19 and MobileNetV2 for MobileNet v1.
for row in vgg19 vgg19-aug; do
  for protocol in paper patient; do
    extra=(); [ $protocol = paper ] && extra=(--set data.split_by=image --set "data.ratios=[0.8, 0.2]" --set data.resplit=true --set evaluation.threshold=fixed --set evaluation.calibrate=false)
    cs train paper-b-$row --data "$CXR" --out "$OUT/paper-b/$row/$protocol" --set model.backbone=timm:tf_efficientnet_lite0 --set "model.weights=$LITE0" "${extra[@]}"
  done
done
# MobileNet rows under the honest protocol only (the paper protocol's inflation is shown by the rows above).
for row in mobilenet mobilenet-aug; do
  cs train paper-b-$row --data "$CXR" --out "$OUT/paper-b/$row/patient" --set model.backbone=mobilenet_v2 --set "model.weights=$MNV2"
done

# Frozen vs fine-tuned (honest protocol), EfficientNet-Lite0 (exact float ImageNet weights).
cs train paper-a-resnet50 --data "$CT" --out "$OUT/ct-lite0-frozen" --set model.backbone=timm:tf_efficientnet_lite0 --set "model.weights=$LITE0"
cs train paper-a-resnet50 --data "$CT" --out "$OUT/ct-lite0-finetune" --set model.backbone=timm:tf_efficientnet_lite0 --set "model.weights=$LITE0" --set model.train_mode=finetune --set model.unfreeze_last=2 --set train.lr=0.0003 --set train.early_stopping=5
cs train paper-b-mobilenet-aug --data "$CXR" --out "$OUT/cxr-lite0-finetune" --set model.backbone=timm:tf_efficientnet_lite0 --set "model.weights=$LITE0" --set model.train_mode=finetune --set model.unfreeze_last=2 --set train.lr=0.0003 --set train.epochs=20 --set train.early_stopping=5

# External checks: CT models on LUNA16 slices (specificity), X-ray models on Figure1 (sensitivity).
for run in paper-a/paper-a-resnet50/patient paper-a/paper-a-resnet50-noprep/patient ct-lite0-frozen ct-lite0-finetune; do
  cs evaluate "$OUT/$run" --data "$S/data/ct-ext-luna16/labels.csv" --out "$OUT/ext-luna16/$run"
done
for run in paper-b/vgg19/patient paper-b/vgg19-aug/patient paper-b/mobilenet-aug/patient cxr-lite0-finetune; do
  cs evaluate "$OUT/$run" --data "$S/data/cxr-ext-figure1/labels.csv" --out "$OUT/ext-figure1/$run"
done
