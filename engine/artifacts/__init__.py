"""The artifact layer: where a run's files live and what they hold.

Every stage reads and writes its outputs through this package: teacher checkpoints
(``teacher``), distilled image sets and real-subset index lists (``distilled``), stored soft
labels (``soft_labels``), student checkpoints and row results (``student``). Each artifact carries
the fingerprint of the settings and inputs it was made from (``fingerprint``), so a resumed run
reuses only what still matches. ``layout`` is the single map of the run directory.
"""
