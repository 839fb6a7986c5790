#!/usr/bin/env python
"""Export a release to formats other tools read as they are: PNG folders, .npz arrays, DPImageBench's gen.npz.

Reads only the release folder (no private data) and writes a new folder. Labels are the teacher's hard
labels (the argmax of its soft labels), never the synthesis targets; gray releases stay one channel.
Beside the images, export.json records the release's privacy block, the counts and every file's sha256.

Examples:
  python export_release.py --release releases/mnist_k10 --format imagefolder --output exports/mnist_k10_png
      (torchvision: ImageFolder("exports/mnist_k10_png/train");
       HuggingFace: load_dataset("imagefolder", data_dir="exports/mnist_k10_png"))
  python export_release.py --release releases/mnist_k10 --format npz --output exports/mnist_k10_npz
  python export_release.py --release releases/mnist_k10 --format gen_npz --output exports/mnist_k10_gen
      (DPImageBench: point its evaluation at exports/mnist_k10_gen/gen.npz)
"""
from __future__ import annotations

from common.cli import StageCLI
from synthesizer.export import ExportConfig, export

cli = StageCLI(__doc__, ExportConfig, export)
build_parser, parse_config, run, main = cli.build_parser, cli.parse_config, cli.run, cli.main

if __name__ == "__main__":
    raise SystemExit(main())
