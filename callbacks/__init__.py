"""Callbacks: ``TrakFeaturizeCallback`` (TRAK features at checkpoint time) and its helpers."""
from callbacks.featurizer import CheckpointFeaturizer, FeaturizeSettings
from callbacks.protocol import AttributableDiffusion, check_protocol
from callbacks.trak_featurize import TrakFeaturizeCallback

__all__ = ["AttributableDiffusion", "CheckpointFeaturizer", "FeaturizeSettings", "TrakFeaturizeCallback",
           "check_protocol"]
