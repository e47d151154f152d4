"""The CLI layer: ``AttributionTrainer`` (a Trainer whose methods are ``cli.py``'s project subcommands:
masks, featurize, sample, score and the LDS/counterfactual commands) and what only those commands use."""
