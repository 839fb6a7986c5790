"""Stages 2 and 3: stat-recording normalization, the DP statistics mechanism, synthesis and release."""
