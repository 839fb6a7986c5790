"""The privacy floor: mechanisms (clipping, the DP statistics, sampling, noise), accountants behind one
table, the privacy ledger and the safe ``.dppt`` checkpoint format. It imports nothing of the project
but the ground floor (``common``), so the guarantee can be read and tested on its own."""
from privacy.accountant import (ACCOUNTANTS, DEFAULT_ACCOUNTANT, DEFAULT_DELTA, Mechanism, calibrate_noise_multiplier,
                                compute_epsilon, poisson_plan, validate_mechanism)
from privacy.checkpoint import (CHECKPOINT_FORMAT, CHECKPOINT_VERSION, STAGES, check_dppt, dppt_payload, load_dppt,
                                save_dppt, strip_wrapper_prefixes)
from privacy.ledger import (claimed_entry, ledger_mechanisms, mechanism_entry, non_private_entry, privacy_block,
                            require_privacy_block, tuning_entry)
from privacy.noise import OS_RANDOM, OSRandom, RandomSource, is_os_random

__all__ = ["ACCOUNTANTS", "CHECKPOINT_FORMAT", "CHECKPOINT_VERSION", "DEFAULT_ACCOUNTANT", "DEFAULT_DELTA", "Mechanism",
           "OS_RANDOM", "OSRandom", "RandomSource", "STAGES", "calibrate_noise_multiplier", "check_dppt",
           "claimed_entry", "compute_epsilon", "dppt_payload", "is_os_random", "ledger_mechanisms", "load_dppt",
           "mechanism_entry", "non_private_entry", "poisson_plan", "privacy_block", "require_privacy_block",
           "save_dppt", "strip_wrapper_prefixes", "tuning_entry", "validate_mechanism"]
