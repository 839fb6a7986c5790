"""Each "Where to add" of docs/code_map.md, done the documented way with a toy entry, runs through its CLI.

The toys are written into a temporary module (``toy_entries``) the way a contributor writes them: a model
constructor under ``@register_model`` (its module import in ``models/__init__.py`` is the import here), a dataset
loader and its one ``DATASETS`` row, a loss term under ``@loss_term`` and its weight field in ``AlignmentConfig``,
and an accountant as one ``ACCOUNTANTS`` entry. The model and the dataset are seen at run time, so they are added
in this process and removed afterwards. The weight field and the accountant must exist when the stages build
their flags (at import), as the edited files make them; a fresh process adds both before importing any stage.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import registry
import save_dp_db_stats
import train_dp
from models import MODELS
from synthesizer.terms import TERMS

REPOSITORY = Path(__file__).resolve().parents[1]
QUIET = ["--device", "cpu", "--no_progress"]
TOY_CLASSES = ("low", "mid", "high")
TOY_WEIGHT = 1000.0

TOY_ENTRIES = '''
"""A toy model, dataset loader and row, loss term and accountant, each written as docs/code_map.md says."""
import torch
from opacus.accountants import RDPAccountant
from torch import nn

import registry
from models import make_private_ready, register_model
from sources.convert import RawTensors
from synthesizer.terms import TermInputs, loss_term


@register_model(norm_layers=1)
def toy_net(num_classes, in_channels=3):
    return make_private_ready(nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16, num_classes)))


def toy_images(root, split, download):
    """Gray 16 x 16 squares, brighter per class: 8 a class to train on, 2 to test on."""
    per_class = 8 if split == "train" else 2
    generator = torch.Generator().manual_seed(len(split))
    labels = torch.arange(3).repeat_interleave(per_class)
    noise = torch.randint(0, 60, (len(labels), 1, 16, 16), generator=generator)
    return RawTensors((noise + 90 * labels.view(-1, 1, 1, 1)).to(torch.uint8), labels)


TOY_SET = registry._spec("toy_set", 3, 16, True, registry.MNIST_NORM, "both", toy_images,
                         class_names=("low", "mid", "high"))


@loss_term("toy")
def toy(inputs: TermInputs) -> torch.Tensor:
    """Brighter is better: minus the mean pixel."""
    return -inputs.images.mean()


class ToyAccountant(RDPAccountant):
    """RDP's epsilon, doubled: a looser bound still keeps the accountant contract, and is easy to recognize."""

    def get_epsilon(self, delta, **kwargs):
        return 2 * super().get_epsilon(delta, **kwargs)
'''

# The documented edits of privacy/accountant.py and synthesizer/deepinversion.py, made before any stage exists.
FRESH_PROCESS = '''
import json
import sys
from dataclasses import dataclass

sys.path.insert(0, sys.argv[1])
assert not [name for name in sys.modules if name.startswith("stages")], "a stage was imported too early"
import registry
import toy_entries
from common.cli import nonnegative_float, option
from common.tables import register
from privacy.accountant import ACCOUNTANTS
from synthesizer import deepinversion

register(registry.DATASETS, "dataset", "toy_set", toy_entries.TOY_SET)
register(ACCOUNTANTS, "accountant", "toy", toy_entries.ToyAccountant)


@dataclass(frozen=True, kw_only=True)
class AlignmentConfig(deepinversion.AlignmentConfig):
    """The class with the field that the toy term's contributor adds to it in deepinversion.py."""

    toy_weight: float = option(0.0, "weight of the toy term", parse=nonnegative_float)


deepinversion.AlignmentConfig = AlignmentConfig
import synthesize
import train_dp

commands = json.loads(sys.argv[2])
results = {"synthesize_help": synthesize.build_parser().format_help(), "train_dp_help":
           train_dp.build_parser().format_help()}
for name, (cli, argv) in commands.items():
    results[name] = str({"synthesize": synthesize, "train_dp": train_dp}[cli].run(argv))
print(json.dumps(results))
'''


def _teacher_flags(output: Path, *extra: str) -> list[str]:
    return ["--dataset", "toy_set", "--model", "toy_net", "--epochs", "1", "--train_batch_size", "8", "--lr", "1",
            "--noise_multiplier", "1", "--stats_epochs", "1", "--stats_batch_size", "8", "--seed", "0",
            "--output", str(output), *extra, *QUIET]


@pytest.fixture(scope="module")
def toys(tmp_path_factory):
    """The folder of ``toy_entries``, imported (its model and term register) and its dataset row added; all gone
    afterwards, so the tables of this process are as they were."""
    folder = tmp_path_factory.mktemp("toys")
    (folder / "toy_entries.py").write_text(TOY_ENTRIES)
    with pytest.MonkeyPatch.context() as patch:
        patch.syspath_prepend(str(folder))
        try:
            import toy_entries  # registers toy_net and the toy term, as models/__init__.py's import would
            patch.setitem(registry.DATASETS, "toy_set", toy_entries.TOY_SET)
            yield folder
        finally:
            MODELS.pop("toy_net", None)
            TERMS.pop("toy", None)  # this process has no toy_weight field: its terms must match its fields again
            sys.modules.pop("toy_entries", None)


@pytest.fixture(scope="module")
def teacher_and_statistics(toys, tmp_path_factory):
    """One toy_net teacher trained on toy_set by train_dp, and its DP statistics."""
    work = tmp_path_factory.mktemp("toy_run")
    teacher = train_dp.run(_teacher_flags(work / "teacher.dppt"))
    statistics = save_dp_db_stats.run(["--teacher", str(teacher), "--dataset", "toy_set", "--seed", "0",
                                       "--output", str(work / "statistics"), *QUIET])
    return Path(teacher), Path(statistics)


@pytest.fixture(scope="module")
def fresh_process(toys, teacher_and_statistics, tmp_path_factory):
    """The loss term's and the accountant's CLI runs, in a process that has their entries from the start."""
    folder = toys
    _, statistics = teacher_and_statistics
    work = tmp_path_factory.mktemp("fresh")
    synthesis = ["--teacher", str(statistics), "--public_set", "photos", "--num_samples", "6", "--k", "2",
                 "--batch_size", "6", "--seed", "0", *QUIET]
    commands = {
        "plain": ["synthesize", synthesis + ["--output", str(work / "plain")]],
        "toy": ["synthesize", synthesis + ["--toy_weight", str(TOY_WEIGHT), "--output", str(work / "toy")]],
        "toy_accountant": ["train_dp", _teacher_flags(work / "toy_accountant.dppt", "--accountant", "toy")],
        "rdp_accountant": ["train_dp", _teacher_flags(work / "rdp_accountant.dppt", "--accountant", "rdp")],
    }
    done = subprocess.run([sys.executable, "-c", FRESH_PROCESS, str(folder), json.dumps(commands)],
                          cwd=REPOSITORY, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _metadata(release: str) -> dict:
    return json.loads((Path(release) / "metadata.json").read_text())


def test_a_model_is_a_decorated_constructor_and_then_is_model_name_in_train_dp(teacher_and_statistics, fresh_process):
    teacher = torch.load(teacher_and_statistics[0], weights_only=True)
    assert teacher["architecture"] == teacher["settings"]["model"] == "toy_net"
    assert sorted(teacher["model"]) == sorted(MODELS["toy_net"](3, 3).state_dict())
    assert MODELS["toy_net"].norm_layers == 1 and MODELS["toy_net"].min_size == 1
    assert "toy_net" in fresh_process["train_dp_help"]


def test_a_dataset_is_a_loader_and_one_row_and_then_is_dataset_name_in_the_stages(teacher_and_statistics,
                                                                                  fresh_process):
    teacher, statistics = (torch.load(path, weights_only=True) for path in teacher_and_statistics)
    assert teacher["dataset"] == statistics["dataset"] == "toy_set"
    assert tuple(teacher["class_names"]) == TOY_CLASSES
    assert teacher["privacy"]["ledger"][0]["sample_rate"] == pytest.approx(8 / 24)  # 24 training images
    assert "toy_set" in fresh_process["train_dp_help"]


def test_a_loss_term_is_a_decorated_function_and_its_weight_field_which_gives_flag_setting_and_images(
        fresh_process):
    assert "--toy_weight" in fresh_process["synthesize_help"]
    plain, toy = _metadata(fresh_process["plain"]), _metadata(fresh_process["toy"])
    assert plain["settings"]["toy_weight"] == 0.0 and toy["settings"]["toy_weight"] == TOY_WEIGHT
    plain_images, toy_images = (np.load(Path(fresh_process[name]) / "images.npy") for name in ("plain", "toy"))
    assert toy_images.mean() > plain_images.mean() + 0.03, "the toy term (minus the mean pixel) did not brighten"


def test_an_accountant_is_one_table_entry_and_then_is_accountant_name_in_train_dp(fresh_process):
    toy, rdp = (torch.load(fresh_process[name], weights_only=True)["privacy"]
                for name in ("toy_accountant", "rdp_accountant"))
    assert toy["accountant"] == "toy" and rdp["accountant"] == "rdp"
    assert toy["ledger"] == rdp["ledger"]
    assert toy["epsilon"] == pytest.approx(2 * rdp["epsilon"])
    assert "{prv,rdp,toy}" in fresh_process["train_dp_help"]
