"""Ledger and privacy block: JSON round trip, recomputation, and refusal of untrusted blocks."""
import json
import math

import pytest

from common.errors import DPImgSynError
from privacy import (claimed_entry, compute_epsilon, ledger_mechanisms, mechanism_entry, non_private_entry,
                     privacy_block, require_privacy_block)

DELTA = 1e-5
N = 60_000


@pytest.fixture()
def ledger():
    """The MNIST epsilon-1 row of Table 1: DP-SGD then DP statistics, sigma 0.8."""
    return [
        mechanism_entry("dp_sgd", 0.8, 128 / N, 4 * 469, 1.0, epochs=4, batch_size=128),
        mechanism_entry("dp_statistics", 0.8, 64 / N, 2 * 938, 1.0, epochs=2, batch_size=64),
    ]


def test_entries_are_plain_and_complete(ledger):
    assert ledger[0] == {"name": "dp_sgd", "noise_multiplier": 0.8, "sample_rate": 128 / N, "steps": 1876,
                         "max_norm": 1.0, "epochs": 4, "batch_size": 128}
    assert ledger_mechanisms(ledger) == [(0.8, 128 / N, 1876), (0.8, 64 / N, 1876)]


def test_block_epsilon_is_the_composition(ledger):
    block = privacy_block(ledger, DELTA)
    assert block["epsilon"] == pytest.approx(0.92, rel=0.02)
    assert block["epsilon"] == compute_epsilon(ledger_mechanisms(block["ledger"]), DELTA)
    assert (block["delta"], block["accountant"]) == (DELTA, "prv")
    assert block["ledger"] == ledger and block["ledger"] is not ledger


def test_block_round_trips_through_json_and_is_accepted(ledger):
    block = privacy_block(ledger, DELTA)
    restored = json.loads(json.dumps(block))
    assert restored == block
    assert require_privacy_block({"privacy": restored}, "teacher.dppt") == block


def test_rdp_block_recomputes_with_rdp(ledger):
    block = privacy_block(ledger, DELTA, accountant="rdp")
    assert block["epsilon"] > privacy_block(ledger, DELTA)["epsilon"]
    assert require_privacy_block({"privacy": block}, "teacher.dppt")["accountant"] == "rdp"


def test_missing_ledger_is_a_privacy_violation():
    for checkpoint in ({"model": {}}, {"privacy": None}, None):
        with pytest.raises(DPImgSynError, match="privacy violation: teacher.dppt has no privacy ledger"):
            require_privacy_block(checkpoint, "teacher.dppt")


def test_missing_ledger_allowed_explicitly_records_infinite_epsilon():
    block = require_privacy_block({"model": {}}, "teacher.dppt", allow_non_private=True)
    assert block["epsilon"] == math.inf
    assert block["ledger"][0]["non_private"] is True
    assert require_privacy_block({"privacy": block}, "next", allow_non_private=True) == block


def test_non_private_entry_makes_epsilon_infinite(ledger):
    block = privacy_block(ledger + [non_private_entry("statistics_without_noise")], DELTA)
    assert block["epsilon"] == math.inf
    restored = json.loads(json.dumps(block))
    with pytest.raises(DPImgSynError, match="not differentially private.*statistics_without_noise"):
        require_privacy_block({"privacy": restored}, "stats.dppt")
    assert require_privacy_block({"privacy": restored}, "stats.dppt", allow_non_private=True)["epsilon"] == math.inf


def test_tampered_epsilon_is_refused(ledger):
    block = privacy_block(ledger, DELTA)
    for forged in (0.5, block["epsilon"] * 0.99, math.inf):
        with pytest.raises(DPImgSynError, match="privacy violation.*altered"):
            require_privacy_block({"privacy": dict(block, epsilon=forged)}, "teacher.dppt", allow_non_private=True)


def test_tampered_ledger_and_delta_are_refused(ledger):
    block = privacy_block(ledger, DELTA)
    fewer_steps = json.loads(json.dumps(block))
    fewer_steps["ledger"][0]["steps"] = 10
    with pytest.raises(DPImgSynError, match="altered"):
        require_privacy_block({"privacy": fewer_steps}, "teacher.dppt")
    dropped_stage = dict(block, ledger=block["ledger"][:1])
    with pytest.raises(DPImgSynError, match="altered"):
        require_privacy_block({"privacy": dropped_stage}, "teacher.dppt")
    with pytest.raises(DPImgSynError, match="altered"):
        require_privacy_block({"privacy": dict(block, delta=1e-3)}, "teacher.dppt")


@pytest.mark.parametrize("corrupt", [
    lambda b: b.pop("ledger"),
    lambda b: b.update(ledger=[]),
    lambda b: b.update(ledger="dp_sgd"),
    lambda b: b.update(epsilon="0.9"),
    lambda b: b.update(epsilon=math.nan),
    lambda b: b.update(accountant="moments"),
    lambda b: b["ledger"][0].pop("sample_rate"),
    lambda b: b["ledger"][0].update(noise_multiplier=-0.8),
    lambda b: b["ledger"].append("not an entry"),
])
def test_malformed_block_is_a_privacy_violation(ledger, corrupt):
    block = json.loads(json.dumps(privacy_block(ledger, DELTA)))
    corrupt(block)
    with pytest.raises(DPImgSynError, match="privacy violation"):
        require_privacy_block({"privacy": block}, "teacher.dppt", allow_non_private=True)


def test_returned_block_is_a_copy(ledger):
    checkpoint = {"privacy": privacy_block(ledger, DELTA)}
    returned = require_privacy_block(checkpoint, "teacher.dppt")
    returned["ledger"][0]["steps"] = 0
    assert checkpoint["privacy"]["ledger"][0]["steps"] == 1876


def test_false_marker_in_extras_keeps_a_dp_entry(ledger):
    entry = mechanism_entry("dp_statistics", 0.8, 64 / N, 1876, 1.0, non_private=False)
    assert privacy_block([ledger[0], entry], DELTA)["epsilon"] == privacy_block(ledger, DELTA)["epsilon"]


def test_claimed_entries_compose_by_basic_composition(ledger):
    claim = claimed_entry("imported_teacher", epsilon=2.0, delta=1e-5, source="original authors")
    block = privacy_block([claim, ledger[1]], DELTA)
    statistics_alone = compute_epsilon([(0.8, 64 / N, 1876)], DELTA)
    assert block["epsilon"] == pytest.approx(2.0 + statistics_alone)
    assert block["delta"] == pytest.approx(2e-5)
    assert ledger_mechanisms(block["ledger"]) == [(0.8, 64 / N, 1876)]
    assert require_privacy_block({"privacy": json.loads(json.dumps(block))}, "imported") == block
    forged = json.loads(json.dumps(block))
    forged["ledger"][0]["epsilon"] = 0.1
    with pytest.raises(DPImgSynError, match="altered"):
        require_privacy_block({"privacy": forged}, "imported")


def test_claim_alone_keeps_its_stated_guarantee():
    block = privacy_block([claimed_entry("imported", epsilon=10.0, delta=1e-5)], DELTA)
    assert (block["epsilon"], block["delta"]) == (10.0, 1e-5)
    assert require_privacy_block({"privacy": block}, "imported")["epsilon"] == 10.0


@pytest.mark.parametrize("make", [
    lambda: mechanism_entry("dp_sgd", -0.8, 0.01, 10, 1.0),
    lambda: mechanism_entry("dp_sgd", math.nan, 0.01, 10, 1.0),
    lambda: mechanism_entry("dp_sgd", 0.8, 0.01, 10, 0.0),
    lambda: mechanism_entry("dp_sgd", 0.8, 0.01, 10, math.inf),
    lambda: mechanism_entry("dp_sgd", 0.8, 2.0, 10, 1.0),
    lambda: mechanism_entry("", 0.8, 0.01, 10, 1.0),
    lambda: mechanism_entry("dp_sgd", 0.8, 0.01, 10, 1.0, non_private=True),
    lambda: mechanism_entry("dp_sgd", 0.8, 0.01, 10, 1.0, device=object()),
    lambda: claimed_entry("imported", epsilon=-1.0, delta=1e-5),
    lambda: claimed_entry("imported", epsilon=1.0, delta=1.0),
    lambda: privacy_block([], DELTA),
])
def test_bad_entries_are_user_errors(make):
    with pytest.raises(DPImgSynError):
        make()
