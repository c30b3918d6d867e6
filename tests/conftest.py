"""Shared fixtures: a tiny RSNA-format synthetic dataset made once per test session."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """A tiny synthetic RSNA dataset (8 train studies, half with segmentations, 2 test studies, 64 px).

    The easy mix (clefts only, no look-alikes): the pipeline tests need a stable, fast set; the realistic mix is
    tested in tests/test_synthetic.py. The answers lie beside it, in ``<root>_answers``.
    """
    from kit.synthetic import make_dataset

    root = tmp_path_factory.mktemp("rsna")
    make_dataset(root, n_train=8, n_test=2, size=64, seed=0, seg_share=0.5, progress=False, difficulty="easy")
    return root
