#!/bin/sh
# Paper rows for private fmnist (ResNet-18 teacher and student).
# Usage: sh scripts/DP/fmnist/kd_resnet18_resnet18/run.sh <epsilon> <public_set>
exec sh "$(dirname "$0")/../../run_row.sh" fmnist "$@"
