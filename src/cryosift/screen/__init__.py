"""Particle screening: tell particles from junk (seed 000's RBM, and a small CNN).

``preprocess`` (resample, bilateral + histogram equalisation, standardise), ``rbm`` (the
classification RBM with label units), ``cnn``, ``calibration`` (Platt / temperature scaling),
``screener`` (a trained, calibrated model and its training), ``data`` (training sets from two
stacks, a label column or good 2D classes), ``model_io`` (safe save/load), ``apply`` (chunked
scoring of a dataset into scores/kept/rejected STAR files) and ``methods`` (bench registration).
"""

from cryosift.screen.preprocess import PreprocessConfig, preprocess
from cryosift.screen.screener import METHODS, Screener, train_screener

__all__ = ["METHODS", "PreprocessConfig", "Screener", "preprocess", "train_screener"]
