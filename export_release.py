#!/usr/bin/env python
"""Export a release to formats other tools read as they are: PNG folders, .npz arrays, DPImageBench's gen.npz.

Reads the release folder and writes a new folder. When the release involves a folder: set (private or public),
the private images are read for one check first: no exported image may be a private one (pass --dataset
folder:PATH for a folder private set). Labels are the teacher's hard
labels (the argmax of its soft labels), never the synthesis targets; gray releases stay one channel.
The soft labels (the teacher's logits) travel too, for distillation: train/soft_labels.npy of an image
folder, the key soft of an .npz. Class folders and the .npz key class_names carry the release's class
names. Beside the images, export.json records the release's privacy block, the counts, the class names,
where the soft labels are and every file's sha256.

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
