"""Counterfactual evaluation workflow: the LDS plan, the subset-model sweep, actual outputs, the compared
methods' scores, the report and top-k retraining. Its statistics (LDS, ceiling, lambda choice, FID) live in
the core (``attribution.lds``, ``attribution.baselines``); the CLI subcommands are in ``commands.lds``."""
