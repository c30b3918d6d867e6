"""Fixed facts of the competition: target names and order, metric weights, HU windows."""

VERTEBRAE = ("C1", "C2", "C3", "C4", "C5", "C6", "C7")
N_VERTEBRAE = len(VERTEBRAE)
TARGETS = ("patient_overall", *VERTEBRAE)

# Competition metric weights, in TARGETS order.
NEGATIVE_WEIGHTS = (7.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)
POSITIVE_WEIGHTS = (14.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0)
LOGLOSS_EPS = 1e-15
# Every probability the kit writes or uses as a fallback lies in [PROB_CLIP, 1 - PROB_CLIP] (finite logits).
PROB_CLIP = 1e-4

# Label values in the competition's segmentation NIfTI files.
SEG_LABELS = {name: i + 1 for i, name in enumerate(VERTEBRAE)}  # C1 -> 1 ... C7 -> 7
THORACIC_LABELS = {f"T{i}": 7 + i for i in range(1, 13)}  # T1 -> 8 ... T12 -> 19
PROB_SCALE = 255  # stage-1 probabilities are stored as uint8 in steps of 1/255 (`kit.stage1.infer.predict_vertebra_probs`)

# HU windows as (center, width).
WINDOWS = {
    "bone": (400.0, 1800.0),
    "soft": (40.0, 400.0),
    "brain": (40.0, 80.0),
}

UID_PREFIX = "1.2.826.0.1.3680043."
KAGGLE_COMPETITION = "rsna-2022-cervical-spine-fracture-detection"

# Real-data prevalences over the 2019 training studies (RSNA_DATA.md), TARGETS order.
TRAIN_PREVALENCE = (0.476, 0.072, 0.141, 0.036, 0.054, 0.080, 0.137, 0.195)
# Studies public top solutions drop from training as broken.
BROKEN_STUDIES = ("1.2.826.0.1.3680043.20574", "1.2.826.0.1.3680043.29952")

# What a stage's models give a study at inference (`kit.stages.Stage.gives`): the roles predictors sort models by.
SEGMENTER = "vertebra_probs"  # per-voxel C1..C7 probabilities (stage 1)
LEVELS = "levels"  # which vertebrae each slice shows (stage 1, fused into the segmenter's input or output)
CLASSIFIER = "fractures"  # the 8 competition probabilities from the vertebra crops (stage 2)
