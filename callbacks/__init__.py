"""Callbacks: ``TrakFeaturizeCallback`` (TRAK features at checkpoint time, for any module implementing
``attribution.protocol``) and ``ScoreWriter`` (the AttributionModule's scores, pictures and index page)."""
from callbacks.score_writer import ScoreWriter
from callbacks.trak_featurize import TrakFeaturizeCallback

__all__ = ["ScoreWriter", "TrakFeaturizeCallback"]
