"""Release evaluation: obfuscation and fidelity against the private data, and the release card.

These functions read private data; their results are internal diagnostics for the data owner
and never go into a release or into the publishable part of its card.
"""
from evaluation.card import (CARD_FORMAT, FIDELITY_NOTE, INTERNAL_FIELDS, NOT_FOR_PUBLICATION, NOT_MEASURED,
                             PUBLISHABLE_FIELDS, build_card, render_card_markdown, write_card)
from evaluation.metrics import (SUMMARY_KEYS, distribution_summary, frechet_distance, gallery_rows, nearest_neighbours,
                                nn_report, obfuscation_verdict, penultimate_features, precision_recall, ssim)

__all__ = ["CARD_FORMAT", "FIDELITY_NOTE", "INTERNAL_FIELDS", "NOT_FOR_PUBLICATION", "NOT_MEASURED",
           "PUBLISHABLE_FIELDS", "SUMMARY_KEYS", "build_card", "distribution_summary",
           "frechet_distance", "gallery_rows", "nearest_neighbours", "nn_report", "obfuscation_verdict",
           "penultimate_features", "precision_recall", "render_card_markdown", "ssim", "write_card"]
