"""Importing the original authors' checkpoints: weights kept, ledger claimed, pickled code never run."""
from __future__ import annotations

import json
import math
import os
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

import import_original
import privacy
import registry
import synthesize
from common.errors import DPImgSynError
from common.files import sha256_file
from evaluation.release import EvaluationConfig, evaluate_release
from stages.importer import STATISTICS_CAVEAT, Dropped, import_original as run_import, restricted_load
from stages.synthesis import load_teacher_for_synthesis
from synthesizer.stat_norm import attach_stat_layers

DATASET = "mnist5k"  # 10 classes; only its spec is read
TEACHER_HISTORY = [(1.2, 0.01, 40)]
STATS_HISTORY = [(0.8, 0.02, 10)]


class SideEffectAccountant:
    """Stands in for the pickled accountant: unpickling it the ordinary way writes a file."""

    def __init__(self, marker: Path, history: list) -> None:
        self.marker = str(marker)
        self.history = history

    def __setstate__(self, state: dict) -> None:
        Path(state["marker"]).write_text("pickled code ran")
        self.__dict__.update(state)


class StdlibGadget:
    """A pickle that makes the loader call ``os.mkdir`` (no class of ours needed to load it)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


ACCOUNTANTS = {
    "setstate": lambda marker, history: SideEffectAccountant(marker, history),
    "stdlib_reduce": lambda marker, history: StdlibGadget(marker),
}


@pytest.fixture(scope="module")
def reference():
    """A resnet18 with distinct random weights (so a swapped or reset tensor is noticed)."""
    torch.manual_seed(0)
    model = registry.get_model("resnet18", 10)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.copy_(torch.randn_like(tensor))
    return model.eval()


def _gn_layers(model) -> list[str]:
    return [name for name, module in model.named_modules() if isinstance(module, torch.nn.GroupNorm)]


def write_original_teacher(path: Path, model, accountant) -> Path:
    state = OrderedDict((f"_module.{key}", value) for key, value in model.state_dict().items())
    torch.save({"model": state, "dp_accountant": accountant}, path)
    return path


def original_statistics_state(model) -> tuple[OrderedDict, dict]:
    """The original stat-layer layout of ``model``'s state, and the statistics placed in it."""
    state = OrderedDict(model.state_dict())
    statistics = {}
    for index, layer in enumerate(_gn_layers(model)):
        weight, bias = state.pop(f"{layer}.weight"), state.pop(f"{layer}.bias")
        channels = weight.numel()
        mean = torch.linspace(-1, 1, channels) + index
        var = torch.linspace(0.5, 2, channels) + index
        state.update({f"{layer}.running_mean": mean, f"{layer}.running_var": var,
                      f"{layer}.num_batches_tracked": torch.tensor(7), f"{layer}.group_norm.weight": weight,
                      f"{layer}.group_norm.bias": bias})
        statistics[layer] = (mean, var)
    return state, statistics


def write_original_statistics(path: Path, model, marker: Path, eps=9.5, delta=1e-5) -> tuple[Path, dict]:
    state, statistics = original_statistics_state(model)
    torch.save({"model": OrderedDict((f"_module.{k}", v) for k, v in state.items()),
                "dp_accountant": SideEffectAccountant(marker, STATS_HISTORY),
                "training_dp_acc": SideEffectAccountant(marker, TEACHER_HISTORY),
                "eps": np.float64(eps), "delta": delta, "bn_nm": 0.8, "bn_epochs": 2}, path)
    return path, statistics


@pytest.mark.parametrize("kind", sorted(ACCOUNTANTS))
def test_fixture_would_run_code_when_loaded_unsafely(kind, reference, tmp_path):
    """Control: the file really is armed, so the import tests below prove something."""
    marker = tmp_path / "marker"
    path = write_original_teacher(tmp_path / "orig.dppt", reference, ACCOUNTANTS[kind](marker, TEACHER_HISTORY))
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("kind", sorted(ACCOUNTANTS))
def test_import_teacher_keeps_weights_claims_ledger_runs_no_code(kind, reference, tmp_path):
    marker = tmp_path / "marker"
    source = write_original_teacher(tmp_path / "orig.dppt", reference, ACCOUNTANTS[kind](marker, TEACHER_HISTORY))
    readable_history = kind == "setstate"
    claim = {} if readable_history else {"epsilon": 1.5, "delta": 2e-5}
    out = run_import(source, tmp_path / "imported", DATASET, **claim)

    assert not marker.exists()
    assert out == tmp_path / "imported.dppt"
    payload = torch.load(out, weights_only=True)
    privacy.check_dppt(payload, stage="teacher", architecture="resnet18", dataset=DATASET)
    expected = reference.state_dict()
    assert list(payload["model"]) == list(expected)
    assert all(torch.equal(payload["model"][key], value) for key, value in expected.items())
    block = privacy.require_privacy_block(payload, "imported teacher")
    (entry,) = block["ledger"]
    assert entry["claimed_by_source"] is True
    wanted_epsilon = privacy.compute_epsilon(TEACHER_HISTORY, 1e-5) if readable_history else 1.5
    assert entry["epsilon"] == pytest.approx(wanted_epsilon) and block["epsilon"] == pytest.approx(wanted_epsilon)
    assert block["delta"] == (1e-5 if readable_history else 2e-5)
    assert entry["source_sha256"] == sha256_file(source)
    dropped = payload["imported_from"]["dropped"]
    assert len(dropped) == 1 and dropped[0].startswith("dp_accountant (")
    model = registry.get_model("resnet18", 10).eval()
    model.load_state_dict(payload["model"])
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x))


def test_import_statistics_feeds_synthesis(reference, tmp_path):
    marker = tmp_path / "marker"
    source, statistics = write_original_statistics(tmp_path / "orig_stats.dppt", reference, marker)
    out = run_import(source, tmp_path / "stats.dppt", DATASET)
    assert not marker.exists()

    payload = torch.load(out, weights_only=True)
    privacy.check_dppt(payload, stage="statistics", architecture="resnet18", dataset=DATASET)
    assert set(payload["dp_statistics"]) == set(attach_stat_layers(registry.get_model("resnet18", 10)))
    for layer, (mean, var) in statistics.items():
        assert torch.equal(payload["dp_statistics"][layer]["mean"], mean)
        assert torch.equal(payload["dp_statistics"][layer]["var"], var)
    # The stated guarantee is recorded but never trusted: the original mechanism never added its noise.
    (entry,) = payload["privacy"]["ledger"]
    assert entry["non_private"] is True and "claimed_by_source" not in entry and entry["caveat"] == STATISTICS_CAVEAT
    assert (entry["stated_epsilon"], entry["stated_delta"]) == (9.5, 1e-5)
    assert payload["privacy"]["epsilon"] == math.inf
    assert payload["imported_from"]["statements"] == {"eps": 9.5, "delta": 1e-5, "bn_nm": 0.8, "bn_epochs": 2}

    with pytest.raises(DPImgSynError, match="privacy violation.*not differentially private"):
        load_teacher_for_synthesis(out, non_private=False, device=torch.device("cpu"))
    teacher, checkpoint, block = load_teacher_for_synthesis(out, non_private=True, device=torch.device("cpu"))
    assert block["epsilon"] == math.inf
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(teacher(x), reference(x))


def test_a_release_from_imported_statistics_says_epsilon_inf(reference, tmp_path, capsys):
    source, _ = write_original_statistics(tmp_path / "orig_stats.dppt", reference, tmp_path / "marker")
    stats = run_import(source, tmp_path / "stats.dppt", DATASET)
    common = ["--teacher", str(stats), "--public_set", "photos", "--num_samples", "6", "--g_steps", "1",
              "--batch_size", "6", "--device", "cpu", "--no_progress", "--output", str(tmp_path / "release")]
    with pytest.raises(SystemExit) as exit_info:
        synthesize.main(common)
    assert exit_info.value.code == 2 and "not differentially private" in capsys.readouterr().err
    assert not (tmp_path / "release").exists()
    assert synthesize.main(common + ["--non_private"]) == 0
    metadata = json.loads((tmp_path / "release" / "metadata.json").read_text())
    assert metadata["privacy"]["epsilon"] == math.inf
    card = evaluate_release(EvaluationConfig(release=str(tmp_path / "release"), output=str(tmp_path / "card"),
                                             device="cpu", max_private=12, gallery_pairs=2))
    assert card["card"]["publishable"]["epsilon"] == "inf"
    assert "epsilon = inf (non-private run" in card["card_markdown"].read_text()


def test_statistics_file_as_teacher_uses_the_training_accountant(reference, tmp_path):
    marker = tmp_path / "marker"
    source, _ = write_original_statistics(tmp_path / "orig_stats.dppt", reference, marker)
    payload = privacy.load_dppt(run_import(source, tmp_path / "teacher.dppt", DATASET, stage="teacher"))
    assert not marker.exists()
    assert payload["stage"] == "teacher" and "dp_statistics" not in payload
    (entry,) = payload["privacy"]["ledger"]
    assert entry["epsilon"] == pytest.approx(privacy.compute_epsilon(TEACHER_HISTORY, 1e-5))
    assert entry["recorded_history"]["training_dp_acc"] == [list(TEACHER_HISTORY[0])]
    assert all(torch.equal(payload["model"][key], value) for key, value in reference.state_dict().items())


@pytest.mark.parametrize(("options", "message"), [
    ({"architecture": "small_cnn"}, "do not fit architecture 'small_cnn'.*missing keys"),
    ({"dataset": "photos"}, "public-only dataset"),
    ({"epsilon": 1.0}, "states its own epsilon and delta; drop --epsilon"),
    ({"stage": "teacher", "delta": 1e-6, "epsilon": 2.0}, "records its accountant history; drop --epsilon"),
])
def test_wrong_options_are_refused_and_nothing_written(options, message, reference, tmp_path):
    source, _ = write_original_statistics(tmp_path / "orig_stats.dppt", reference, tmp_path / "marker")
    arguments = {"dataset": DATASET, **options}
    with pytest.raises(DPImgSynError, match=message):
        run_import(source, tmp_path / "out.dppt", **arguments)
    assert not (tmp_path / "out.dppt").exists()


def test_teacher_without_any_accounting_needs_a_stated_epsilon(reference, tmp_path):
    source = write_original_teacher(tmp_path / "orig.dppt", reference, StdlibGadget(tmp_path / "marker"))
    with pytest.raises(DPImgSynError, match="pass --epsilon and --delta"):
        run_import(source, tmp_path / "out.dppt", DATASET)
    with pytest.raises(DPImgSynError, match="teacher checkpoint without normalization statistics"):
        run_import(source, tmp_path / "out.dppt", DATASET, stage="statistics", epsilon=1.0)
    assert not (tmp_path / "marker").exists() and not (tmp_path / "out.dppt").exists()


def test_existing_output_is_kept_or_refused_never_overwritten(reference, tmp_path):
    source = write_original_teacher(tmp_path / "orig.dppt", reference, SideEffectAccountant(tmp_path / "m", []))
    out = run_import(source, tmp_path / "out.dppt", DATASET, epsilon=1.0)
    before = out.read_bytes()
    assert run_import(source, out, DATASET, epsilon=1.0) == out
    with pytest.raises(DPImgSynError, match="epsilon"):
        run_import(source, out, DATASET, epsilon=2.0)
    assert out.read_bytes() == before


def test_tensor_kinds_survive_the_restricted_loader(tmp_path):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    content = {"param": torch.nn.Parameter(torch.ones(3)), "view": base[1:], "transposed": base.t(), "base": base,
               "bool": torch.tensor([True, False]), "bf16": torch.tensor([1.5], dtype=torch.bfloat16),
               "long": torch.tensor([2**40]), "empty": torch.zeros(0, 5), "np_float": np.float64(0.25),
               "np_int": np.int64(-3), "nested": [1, (2.0, "x"), None],
               "unknown": SideEffectAccountant(tmp_path / "m", [])}
    torch.save(content, tmp_path / "kinds.pt")
    loaded = restricted_load(tmp_path / "kinds.pt")
    for key in ("view", "transposed", "base", "bool", "bf16", "long", "empty"):
        assert loaded[key].dtype == content[key].dtype and torch.equal(loaded[key], content[key]), key
    assert type(loaded["param"]) is torch.Tensor and torch.equal(loaded["param"], torch.ones(3))
    assert (loaded["np_float"], loaded["np_int"]) == (0.25, -3)
    assert loaded["nested"] == [1, (2.0, "x"), None]
    assert isinstance(loaded["unknown"], Dropped) and loaded["unknown"].source.endswith(".SideEffectAccountant")
    assert not (tmp_path / "m").exists()


def _rewrite_record(source: Path, target: Path, suffix: str, data: bytes) -> Path:
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            new.writestr(info, data if info.filename.endswith(suffix) else old.read(info))
    return target


@pytest.mark.parametrize("damage", ["truncated", "short_tensor_record", "legacy", "no_model"])
def test_damaged_files_give_one_clear_error(damage, tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"model": {"w": torch.ones(4)}, "dp_accountant": None}, good)
    bad = tmp_path / "bad.pt"
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif damage == "short_tensor_record":
        _rewrite_record(good, bad, "/data/0", b"\0" * 8)
    elif damage == "legacy":
        torch.save({"model": {"w": torch.ones(4)}}, bad, _use_new_zipfile_serialization=False)
    else:
        torch.save({"weights": {"w": torch.ones(4)}}, bad)
    message = "no 'model' state dict" if damage == "no_model" else "zip-format|truncated, corrupt"
    with pytest.raises(DPImgSynError, match=message):
        run_import(bad, tmp_path / "out.dppt", DATASET, epsilon=1.0)
    assert not (tmp_path / "out.dppt").exists()


def test_cli_imports_and_reports_errors_in_one_line(reference, tmp_path, capsys):
    source = write_original_teacher(tmp_path / "orig.dppt", reference, SideEffectAccountant(tmp_path / "m", []))
    common = ["--source", str(source), "--dataset", DATASET, "--output", str(tmp_path / "cli.dppt")]
    assert import_original.main(common + ["--epsilon", "3", "--delta", "1e-5"]) == 0
    assert privacy.load_dppt(tmp_path / "cli.dppt")["privacy"]["epsilon"] == 3.0
    with pytest.raises(SystemExit) as exit_info:
        import_original.main(common[:-1] + [str(tmp_path / "other.dppt"), "--model", "resnet34", "--epsilon", "3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "resnet34" in err[0]
    assert not (tmp_path / "other.dppt").exists() and not (tmp_path / "m").exists()
