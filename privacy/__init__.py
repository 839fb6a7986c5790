"""Privacy accounting, the privacy ledger, and the safe ``.dppt`` checkpoint format."""
from privacy.accountant import (
    DEFAULT_DELTA,
    Mechanism,
    calibrate_noise_multiplier,
    compute_epsilon,
    get_preset,
    load_presets,
    poisson_plan,
    preset_plan,
    validate_mechanism,
)
from privacy.checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    STAGES,
    check_dppt,
    dppt_payload,
    file_sha256,
    load_dppt,
    save_dppt,
    strip_wrapper_prefixes,
)
from privacy.ledger import (
    claimed_entry,
    ledger_mechanisms,
    mechanism_entry,
    non_private_entry,
    privacy_block,
    require_privacy_block,
)
from privacy.noise import OS_RANDOM, OSRandom, RandomSource, is_os_random

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "DEFAULT_DELTA", "Mechanism", "STAGES",
    "calibrate_noise_multiplier", "check_dppt", "claimed_entry", "compute_epsilon", "dppt_payload",
    "file_sha256", "get_preset", "ledger_mechanisms", "load_dppt", "load_presets", "mechanism_entry",
    "non_private_entry", "poisson_plan", "preset_plan", "privacy_block", "require_privacy_block",
    "OS_RANDOM", "OSRandom", "RandomSource", "is_os_random", "save_dppt", "strip_wrapper_prefixes",
    "validate_mechanism",
]
