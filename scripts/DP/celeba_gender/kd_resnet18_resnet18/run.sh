#!/bin/sh
# Paper rows for private celeba_gender (ResNet-18 teacher and student).
# Usage: sh scripts/DP/celeba_gender/kd_resnet18_resnet18/run.sh <epsilon> <public_set>
exec sh "$(dirname "$0")/../../run_row.sh" celeba_gender "$@"
