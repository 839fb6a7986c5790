"""Shared machinery of the stage scripts: CLI helpers, seeding, logging, training loops."""
