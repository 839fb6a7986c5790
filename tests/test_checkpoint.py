"""The .dppt format: plain round trip, wrapper prefixes, corrupt files, and hostile pickles."""
import hashlib
import math
import pickle
from collections import OrderedDict

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from torch import nn

from common.errors import DPImgSynError
from common.files import sha256_file
from privacy import (CHECKPOINT_FORMAT, check_dppt, dppt_payload, load_dppt, mechanism_entry, privacy_block, save_dppt,
                     strip_wrapper_prefixes)


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3))


@pytest.fixture(scope="module")
def block():
    return privacy_block([mechanism_entry("dp_sgd", 1.0, 0.01, 100, 1.0)], 1e-5, accountant="rdp")


def payload_of(model_state, block, **extra):
    return dppt_payload("teacher", model_state, "tiny", 3, "mnist5k", block,
                        args={"lr": 0.1, "epochs": 2, "device": "cpu"}, test_acc=0.5, **extra)


class CreatesFileWhenUnpickled:
    """A hostile object: unpickling it calls open(path, "w"), creating the file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_round_trip_appends_suffix_and_loads_with_weights_only(tmp_path, block):
    model = tiny_model()
    payload = payload_of(model.state_dict(), block, rng={"torch": torch.get_rng_state(), "numpy": [1, 2, 3]},
                         best=math.inf, notes=None, shape=(3, 32, 32))
    path = save_dppt(tmp_path / "teacher", payload)
    assert path == tmp_path / "teacher.dppt" and path.is_file()
    assert save_dppt(path, payload) == path  # the suffix is not doubled
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.dppt"]  # no temporary file left

    direct = torch.load(path, map_location="cpu", weights_only=True)
    for loaded in (load_dppt(path), load_dppt(tmp_path / "teacher"), direct):
        assert loaded.keys() == payload.keys()
        assert loaded["format"] == CHECKPOINT_FORMAT and loaded["privacy"] == block
        assert loaded["args"] == payload["args"] and loaded["best"] == math.inf and loaded["shape"] == (3, 32, 32)
        assert torch.equal(loaded["rng"]["torch"], payload["rng"]["torch"])
        for key, tensor in model.state_dict().items():
            assert torch.equal(loaded["model"][key], tensor)
    assert check_dppt(load_dppt(path), stage="teacher", architecture="tiny", dataset="mnist5k")


def test_opacus_wrapped_state_is_stored_without_prefixes(tmp_path, block):
    model = tiny_model()
    wrapped = GradSampleModule(model)
    assert all(key.startswith("_module.") for key in wrapped.state_dict())
    path = save_dppt(tmp_path / "teacher", payload_of(wrapped.state_dict(), block))
    stored = load_dppt(path)["model"]
    assert list(stored) == list(model.state_dict())
    fresh = nn.Sequential(nn.Conv2d(1, 2, 3), nn.GroupNorm(1, 2), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))
    fresh.load_state_dict(stored)
    x = torch.randn(2, 1, 6, 6)
    assert torch.equal(fresh(x), model(x))


def test_prefixes_stripped_only_when_every_key_has_them():
    weight = torch.zeros(1)
    assert list(strip_wrapper_prefixes({"module._module.fc.weight": weight, "module._module.fc.bias": weight})) == [
        "fc.weight", "fc.bias"]
    mixed = {"module.weight": weight, "head.weight": weight}  # a real submodule named "module"
    assert list(strip_wrapper_prefixes(mixed)) == list(mixed)
    assert strip_wrapper_prefixes({}) == {}


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.dppt"
    evil = {"model": CreatesFileWhenUnpickled(marker)}
    if writer == "torch.save":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil, protocol=2))

    control = tmp_path / "control"  # the payload really is hostile: a plain unpickler runs it
    pickle.loads(pickle.dumps({"model": CreatesFileWhenUnpickled(control)}, protocol=2))
    assert control.exists()

    with pytest.raises(DPImgSynError) as caught:
        load_dppt(path)
    message = str(caught.value)
    assert "refused to load" in message and "could run code" in message and "\n" not in message
    assert "open" in message  # names the refused object
    assert not marker.exists()


def test_truncated_and_empty_files_are_user_errors(tmp_path, block):
    path = save_dppt(tmp_path / "teacher", payload_of(tiny_model().state_dict(), block))
    data = path.read_bytes()
    for name, content in (("truncated.dppt", data[: len(data) // 2]), ("empty.dppt", b""), ("junk.dppt", b"x" * 64)):
        broken = tmp_path / name
        broken.write_bytes(content)
        with pytest.raises(DPImgSynError, match="truncated, corrupt") as caught:
            load_dppt(broken)
        assert "\n" not in str(caught.value)


def test_missing_path_and_directory_are_user_errors(tmp_path):
    with pytest.raises(DPImgSynError, match="not found"):
        load_dppt(tmp_path / "absent.dppt")
    with pytest.raises(DPImgSynError, match="not found"):
        load_dppt(tmp_path)


def test_non_dict_checkpoint_is_refused(tmp_path):
    path = tmp_path / "list.dppt"
    torch.save([torch.zeros(1)], path)
    with pytest.raises(DPImgSynError, match="not a DP-ImgSyn checkpoint"):
        load_dppt(path)


@pytest.mark.parametrize("bad_value, where", [
    (torch.device("cpu"), "torch.device"),
    (np.float64(0.5), "numpy.float64"),
    (np.zeros(2), "numpy.ndarray"),
    ({1, 2}, "set"),
    (CreatesFileWhenUnpickled("unused"), "CreatesFileWhenUnpickled"),
    (nn.Linear(1, 1), "Linear"),
])
def test_non_plain_payload_is_refused_at_save(tmp_path, block, bad_value, where):
    path = save_dppt(tmp_path / "teacher", payload_of({}, block))
    before = path.read_bytes()
    with pytest.raises(DPImgSynError, match=rf"payload\['args'\]\['bad'\].*{where}"):
        save_dppt(path, dict(payload_of({}, block), args={"bad": bad_value}))
    assert path.read_bytes() == before  # the existing artifact is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["teacher.dppt"]


def test_non_plain_keys_and_payload_types_are_refused(tmp_path):
    with pytest.raises(DPImgSynError, match="a key of"):
        save_dppt(tmp_path / "x", {"model": {(1, 2): torch.zeros(1)}})
    with pytest.raises(DPImgSynError, match="must be a dict"):
        save_dppt(tmp_path / "x", [torch.zeros(1)])
    assert not (tmp_path / "x.dppt").exists()


def test_check_dppt_names_the_mismatch(block):
    payload = payload_of(OrderedDict(), block)
    cases = [
        ({"stage": "statistics"}, "stage 'teacher' but 'statistics'"),
        ({"architecture": "resnet18"}, "architecture 'tiny' but 'resnet18'"),
        ({"dataset": "cifar10"}, "dataset 'mnist5k' but 'cifar10'"),
    ]
    for expected, message in cases:
        with pytest.raises(DPImgSynError, match=message):
            check_dppt(payload, **expected)
    with pytest.raises(DPImgSynError, match="not a DP-ImgSyn checkpoint"):
        check_dppt({"model": {}, "dp_accountant": None})
    with pytest.raises(DPImgSynError, match="version 2"):
        check_dppt(dict(payload, version=2))
    with pytest.raises(DPImgSynError, match="lacks \\['privacy'\\]"):
        check_dppt({k: v for k, v in payload.items() if k != "privacy"})
    with pytest.raises(DPImgSynError, match="unknown checkpoint stage"):
        dppt_payload("student", {}, "tiny", 3, "mnist5k", block)


def test_sha256_file(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(b"dp-imgsyn" * 1000)
    assert sha256_file(path) == hashlib.sha256(b"dp-imgsyn" * 1000).hexdigest()
