"""Reading: DICOM series (the only pixel reader), the RSNA tables and folds, the HU cache, read-ahead, atomic files."""
