"""RSNA-format synthetic cervical-spine CT: studies, DICOM series, segmentations, whole datasets and their answers.

Everything here is deterministic by seed and built from analytic shapes with numpy broadcasting, so the
kit's tests and demo can run the real pipeline without the competition data:

* :func:`make_study` builds one axial CT volume in HU (index 0 = most superior slice) with its ground truth:
  a per-voxel vertebra label map (1..7 = C1..C7, 8 = T1, 9 = T2), per-vertebra fracture labels, the
  per-slice fracture boxes, and what was drawn (fracture kinds and subtlety, look-alikes).
* :func:`write_study` writes it as one ``<InstanceNumber>.dcm`` CT file per slice, in any of
  :data:`TRANSFER_SYNTAXES` (including JPEG Lossless SV1, which pydicom cannot encode:
  :func:`encode_jpeg_lossless`), head-first or feet-first, with the header variations seen in the competition.
* :func:`write_segmentation` writes the label map as a NIfTI file stored the way RSNA's are, with an
  affine consistent with the DICOM geometry.
* :func:`make_dataset` writes the whole competition layout (CSV tables, ``train_images``, ``test_images``,
  ``segmentations``) in parallel, and the answers (test labels, every fracture and look-alike) beside it;
  :func:`load_answers` reads them.

Modules: :mod:`~kit.synthetic.shapes` (solid primitives, the volume grid), :mod:`~kit.synthetic.anatomy`
(the drawn neck: bones, discs, soft tissue), :mod:`~kit.synthetic.fractures` (labels, fracture kinds,
look-alikes), :mod:`~kit.synthetic.study` (one study, step by step), :mod:`~kit.synthetic.dicom_writer`,
:mod:`~kit.synthetic.jpeg_lossless`, :mod:`~kit.synthetic.dataset`, :mod:`~kit.synthetic.pictures` (the
gallery of ``docs/synthetic.md``).

numpy / pandas / pydicom / nibabel / scipy only: never imports torch.
"""

from .anatomy import HU_RANGE, LEVEL_LABELS, LEVELS
from .dataset import (
    ANSWER_FILES,
    PREDICTION_TYPES,
    PUBLIC_TEST_CSV_UIDS,
    default_answers_dir,
    load_answers,
    make_dataset,
)
from .dicom_writer import (
    DATASET_TRANSFER_SYNTAXES,
    EXACT_ENCODINGS,
    TRANSFER_SYNTAXES,
    segmentation_affine,
    stored_range,
    write_segmentation,
    write_study,
)
from .fractures import (
    DIFFICULTIES,
    FRACTURE_KINDS,
    KIND_MIX,
    LOOKALIKE_KINDS,
    LOOKALIKE_MIX,
    sample_fracture_kind,
    sample_fractures,
    sample_lookalikes,
)
from .jpeg_lossless import encode_jpeg_lossless
from .study import VISIBLE_HU, SyntheticStudy, make_study

__all__ = [
    "ANSWER_FILES",
    "DATASET_TRANSFER_SYNTAXES",
    "DIFFICULTIES",
    "EXACT_ENCODINGS",
    "FRACTURE_KINDS",
    "HU_RANGE",
    "KIND_MIX",
    "LEVELS",
    "LEVEL_LABELS",
    "LOOKALIKE_KINDS",
    "LOOKALIKE_MIX",
    "PREDICTION_TYPES",
    "PUBLIC_TEST_CSV_UIDS",
    "TRANSFER_SYNTAXES",
    "VISIBLE_HU",
    "SyntheticStudy",
    "default_answers_dir",
    "encode_jpeg_lossless",
    "load_answers",
    "make_dataset",
    "make_study",
    "sample_fracture_kind",
    "sample_fractures",
    "sample_lookalikes",
    "segmentation_affine",
    "stored_range",
    "write_segmentation",
    "write_study",
]
