"""Multiple-instance learning on bags of patch embeddings.

A slide (or a patient) is a bag of patch embeddings from one encoder
(:mod:`.bags`, HDF5 as CLAM and TRIDENT write); an attention head reads the whole bag
and calls all biomarkers at once (:mod:`.heads`); :func:`train_mil` fits it with
masked multi-task loss, early stopping and per-task temperature scaling
(:mod:`.train`, :mod:`.calibration`) into a :class:`FittedMIL` saved as one file
(:mod:`.model`); :mod:`.folds` makes cross-validation folds that keep tissue source
sites apart, and bootstrap intervals over patients.

    >>> model = train_mil(train_bags, y_train, val_bags, y_val, head="abmil", seed=0)
    >>> model.save("mil.pt")
    >>> FittedMIL.load("mil.pt").predict(read_bag("slide.h5"))  # {"tp53": 0.71, ...}
"""

from services.mil.bags import Bag, BagWriter, merge_bags, read_bag, save_bag, write_bag
from services.mil.calibration import TaskCalibration, fit_task_temperatures, reliability_diagrams
from services.mil.folds import bootstrap_ci, patient_sites, site_folds, site_of
from services.mil.heads import GatedAttentionMIL, MilOutput, TransformerMIL, build_head
from services.mil.model import FittedMIL, MilPrediction, TrainingData
from services.mil.train import MilTrainingConfig, masked_bce, train_mil

__all__ = [
    "Bag",
    "BagWriter",
    "FittedMIL",
    "GatedAttentionMIL",
    "MilOutput",
    "MilPrediction",
    "MilTrainingConfig",
    "TaskCalibration",
    "TrainingData",
    "TransformerMIL",
    "bootstrap_ci",
    "build_head",
    "fit_task_temperatures",
    "masked_bce",
    "merge_bags",
    "patient_sites",
    "read_bag",
    "reliability_diagrams",
    "save_bag",
    "site_folds",
    "site_of",
    "train_mil",
    "write_bag",
]
