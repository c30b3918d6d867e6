"""DICOM and NIfTI writers for synthetic studies: one CT file per slice in the competition's header variants, and
the segmentation stored the way RSNA's are.

pydicom / nibabel / numpy only.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..constants import WINDOWS
from .jpeg_lossless import encode_jpeg_lossless
from .study import SyntheticStudy

log = logging.getLogger(__name__)

_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


def _transfer_syntaxes() -> dict[str, Any]:
    from pydicom.uid import (
        ExplicitVRBigEndian,
        ExplicitVRLittleEndian,
        ImplicitVRLittleEndian,
        JPEG2000Lossless,
        JPEGLosslessSV1,
        RLELossless,
    )

    syntaxes = {
        "explicit": ExplicitVRLittleEndian,
        "implicit": ImplicitVRLittleEndian,
        "jpeg-lossless": JPEGLosslessSV1,
        "rle": RLELossless,
        "big-endian": ExplicitVRBigEndian,
    }
    try:
        from pydicom.pixels.encoders import JPEG2000LosslessEncoder, JPEGLSLosslessEncoder

        if JPEG2000LosslessEncoder.is_available:
            syntaxes["jpeg2000"] = JPEG2000Lossless
        if JPEGLSLosslessEncoder.is_available:
            from pydicom.uid import JPEGLSLossless

            syntaxes["jpeg-ls"] = JPEGLSLossless
    except ImportError:  # pragma: no cover - pydicom < 3
        pass
    return syntaxes


#: name -> transfer syntax UID for :func:`write_study`. "jpeg-lossless" is JPEG Lossless, Non-Hierarchical,
#: First-Order Prediction (Process 14, Selection Value 1), 1.2.840.10008.1.2.4.70, as in the competition.
#: "jpeg2000" / "jpeg-ls" appear only where pydicom has an encoder for them.
TRANSFER_SYNTAXES = _transfer_syntaxes()

#: Transfer syntaxes a dataset cycles through (the ones seen in the competition, plus RLE).
DATASET_TRANSFER_SYNTAXES = ("implicit", "jpeg-lossless", "explicit", "rle")

#: (RescaleIntercept, signed, BitsStored) combinations that represent HU_RANGE exactly.
EXACT_ENCODINGS = ((-1024, False, 12), (-1024, True, 16), (0, True, 12), (-1024, False, 16), (0, True, 16))


def _ds(value: float) -> str:
    """A DS string (<= 16 characters) for a number."""
    text = f"{value:.6f}".rstrip("0").rstrip(".")
    if text in ("-0", ""):
        text = "0"
    return text[:16]


def stored_range(bits_stored: int, signed: bool) -> tuple[int, int]:
    """The stored values a (BitsStored, PixelRepresentation) pair can hold."""
    return (-(1 << (bits_stored - 1)), (1 << (bits_stored - 1)) - 1) if signed else (0, (1 << bits_stored) - 1)


def write_study(study: SyntheticStudy, study_dir: str | os.PathLike, *, transfer_syntax: str = "explicit",
                head_first: bool = True, intercept: int = -1024, bits_stored: int = 16, signed: bool = True,
                modality: bool = True) -> list[Path]:
    """Write ``study`` as one CT DICOM file per slice, ``<InstanceNumber>.dcm``.

    Args:
        study_dir: created if missing.
        transfer_syntax: a key of :data:`TRANSFER_SYNTAXES`.
        head_first: InstanceNumber 1 = most superior slice (True) or most inferior (False, feet -> head).
        intercept: RescaleIntercept (slope is always 1): stored = HU - intercept.
        bits_stored: 12 or 16 (BitsAllocated is 16, HighBit = BitsStored - 1).
        signed: PixelRepresentation 1 (two's complement; with 12 bits the upper 4 bits are written as 0, so a
            reader must sign-extend) or 0.
        modality: write Modality "CT"; False omits (0008,0060) like a real training slice.

    Returns:
        The written paths, in InstanceNumber order. HU values the chosen encoding cannot represent are clipped
        (with a warning); every combination in :data:`EXACT_ENCODINGS` round-trips ``study.hu`` exactly.
    """
    import pydicom
    from pydicom.dataelem import DataElement
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(f"unknown transfer_syntax {transfer_syntax!r}; available: {sorted(TRANSFER_SYNTAXES)}")
    if bits_stored not in (12, 16):
        raise ValueError(f"bits_stored must be 12 or 16, got {bits_stored}")
    ts_uid = TRANSFER_SYNTAXES[transfer_syntax]
    study_dir = Path(study_dir)
    study_dir.mkdir(parents=True, exist_ok=True)
    Z, H, W = study.hu.shape
    dz, dy, dx = study.spacing

    stored = study.hu.astype(np.int32) - int(intercept)
    lo, hi = stored_range(bits_stored, signed)
    if stored.min() < lo or stored.max() > hi:
        log.warning("study %s: HU outside what BitsStored=%d, signed=%s, intercept=%d can hold; clipped to "
                    "[%d, %d] HU", study.uid, bits_stored, signed, intercept, lo + intercept, hi + intercept)
        stored = np.clip(stored, lo, hi)
    mask = (1 << bits_stored) - 1
    raw = (stored & mask).astype(np.uint16)  # the bit pattern of each sample, upper bits 0

    base = Dataset()
    base.SpecificCharacterSet = "ISO_IR 100"
    base.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    base.SOPClassUID = _CT_IMAGE_STORAGE
    if modality:
        base.Modality = "CT"
    base.Manufacturer = "kit.synthetic"
    base.PatientName = study.uid.rsplit(".", 1)[-1]
    base.PatientID = study.uid.rsplit(".", 1)[-1]
    base.BodyPartExamined = "CSPINE"
    base.SliceThickness = _ds(dz)
    base.KVP = "120"
    base.ConvolutionKernel = "BONE"
    base.PatientPosition = "HFS"
    base.StudyInstanceUID = study.uid
    base.SeriesInstanceUID = f"{study.uid}.1"
    base.StudyID = ""
    base.SeriesNumber = 1
    base.FrameOfReferenceUID = f"{study.uid}.2"
    base.ImageOrientationPatient = [_ds(v) for v in study.orientation]
    base.SamplesPerPixel = 1
    base.PhotometricInterpretation = "MONOCHROME2"
    base.Rows = H
    base.Columns = W
    base.PixelSpacing = [_ds(dy), _ds(dx)]
    base.BitsAllocated = 16
    base.BitsStored = bits_stored
    base.HighBit = bits_stored - 1
    base.PixelRepresentation = int(signed)
    center, width = WINDOWS["bone"]
    base.WindowCenter = _ds(center)
    base.WindowWidth = _ds(width)
    base.RescaleIntercept = _ds(intercept)
    base.RescaleSlope = "1"
    base.RescaleType = "HU"

    compressed = transfer_syntax not in ("explicit", "implicit", "big-endian")
    if compressed:
        base.LossyImageCompression = "00"
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = _CT_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = f"{study.uid}.1.1"
    meta.TransferSyntaxUID = ts_uid
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"PYDICOM {pydicom.__version__}"[:16]
    series = _SeriesEncoder(base, meta)

    encoder = plugin = None
    if transfer_syntax in ("rle", "jpeg2000", "jpeg-ls"):
        from pydicom.pixels import encoders

        encoder = {"rle": encoders.RLELosslessEncoder, "jpeg2000": getattr(encoders, "JPEG2000LosslessEncoder", None),
                   "jpeg-ls": getattr(encoders, "JPEGLSLosslessEncoder", None)}[transfer_syntax]
        plugin = "pylibjpeg" if transfer_syntax == "rle" and "pylibjpeg" in encoder.available_plugins else ""
    instance = study.instance_numbers(head_first)
    paths = []
    for hu_index in np.argsort(instance):
        n = int(instance[hu_index])
        frame = raw[hu_index]
        if transfer_syntax in ("explicit", "implicit"):
            pixel_data = DataElement(0x7FE00010, "OW", frame.astype("<u2").tobytes())
        elif transfer_syntax == "big-endian":
            pixel_data = DataElement(0x7FE00010, "OW", frame.astype(">u2").tobytes())
        else:
            if transfer_syntax == "jpeg-lossless":
                encoded = encode_jpeg_lossless(frame, bits_stored)
            else:
                arr = stored[hu_index].astype(np.int16 if signed else np.uint16)
                encoded = encoder.encode(arr, encoding_plugin=plugin, rows=H, columns=W, samples_per_pixel=1,
                                         bits_allocated=16, bits_stored=bits_stored, pixel_representation=int(signed),
                                         photometric_interpretation="MONOCHROME2", number_of_frames=1)
            pixel_data = DataElement(0x7FE00010, "OB", encapsulate([encoded], has_bot=True),
                                     is_undefined_length=True)
        pos = study.position(int(hu_index))
        sop_uid = f"{study.uid}.1.{n}"
        elements = [DataElement(0x00080018, "UI", sop_uid), DataElement(0x00200013, "IS", str(n)),
                    DataElement(0x00200032, "DS", [_ds(p) for p in pos]), DataElement(0x00201041, "DS", _ds(pos[2])),
                    pixel_data]
        path = study_dir / f"{n}.dcm"
        path.write_bytes(series.encode(elements, sop_uid))
        paths.append(path)
    return paths


class _SeriesEncoder:
    """Encodes the files of one series with pydicom's element writers, the invariant elements only once.

    A file is the 128-byte preamble, "DICM", the file meta group (explicit VR little endian, with its group
    length) and the dataset in the transfer syntax of ``meta``; the per-slice elements are slotted between the
    pre-encoded runs of invariant ones, so the bytes equal ``pydicom.dcmwrite(..., enforce_file_format=True)``
    of the whole dataset (``dataset()`` builds it; the tests compare the two).
    """

    def __init__(self, base, meta, dynamic=(0x00080018, 0x00200013, 0x00200032, 0x00201041, 0x7FE00010)):
        from pydicom.dataset import Dataset
        from pydicom.uid import UID

        syntax = UID(meta.TransferSyntaxUID)
        self.implicit, self.little = syntax.is_implicit_VR, syntax.is_little_endian
        self.base, self.meta, self.dynamic = base, meta, sorted(dynamic)
        bounds = [-1, *self.dynamic, 1 << 32]
        self.runs = []
        for lo, hi in zip(bounds[:-1], bounds[1:]):
            part = Dataset()
            for elem in base:
                if lo < elem.tag < hi:
                    part.add(elem)
            self.runs.append(self._encode(part, self.implicit, self.little, base.get("SpecificCharacterSet")))

    @staticmethod
    def _encode(ds, implicit: bool, little: bool, charset=None) -> bytes:
        from pydicom.filebase import DicomBytesIO
        from pydicom.filewriter import write_dataset

        fp = DicomBytesIO()
        fp.is_implicit_VR, fp.is_little_endian = implicit, little
        write_dataset(fp, ds, charset or "iso8859")
        return fp.getvalue()

    def _meta_bytes(self, sop_uid: str) -> bytes:
        from pydicom.dataset import Dataset

        meta = Dataset()
        for elem in self.meta:
            if elem.tag != 0x00020000:
                meta.add(elem)
        meta.MediaStorageSOPInstanceUID = sop_uid
        body = self._encode(meta, False, True)
        return b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little") + body

    def encode(self, elements, sop_uid: str) -> bytes:
        """File bytes for one slice; ``elements`` are the per-slice DataElements (tags as in ``dynamic``)."""
        from pydicom.dataset import Dataset

        by_tag = {int(e.tag): e for e in elements}
        if sorted(by_tag) != self.dynamic:
            raise ValueError(f"expected elements {[hex(t) for t in self.dynamic]}, got {[hex(t) for t in by_tag]}")
        chunks = [b"\x00" * 128, b"DICM", self._meta_bytes(sop_uid), self.runs[0]]
        charset = self.base.get("SpecificCharacterSet")
        for tag, run in zip(self.dynamic, self.runs[1:]):
            one = Dataset()
            one.add(by_tag[tag])
            chunks += [self._encode(one, self.implicit, self.little, charset), run]
        return b"".join(chunks)

    def dataset(self, elements, sop_uid: str):
        """The same slice as a complete pydicom Dataset (slow; for checks)."""
        import copy

        ds = copy.deepcopy(self.base)
        ds.file_meta = copy.deepcopy(self.meta)
        ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
        ds.preamble = b"\x00" * 128
        for elem in elements:
            ds.add(elem)
        return ds


def segmentation_affine(study: SyntheticStudy, head_first: bool = True) -> np.ndarray:
    """(4, 4) RAS affine of the raw array :func:`write_segmentation` stores for ``study``.

    Raw voxel (i, j, kk): column i, row H-1-j, the slice with InstanceNumber Z-kk.
    """
    Z, H, W = study.hu.shape
    dz, dy, dx = study.spacing
    row_dir = np.array(study.orientation[:3], float)
    col_dir = np.array(study.orientation[3:], float)
    normal = np.cross(row_dir, col_dir)  # +z (superior) for [1,0,0,0,1,0]
    origin = np.array(study.origin, float)
    # LPS of raw voxel (0, 0, 0): column 0, row H-1, slice with InstanceNumber Z
    hu_first = 0 if not head_first else Z - 1  # hu index of the slice with InstanceNumber Z
    p0 = origin + (H - 1) * dy * col_dir - hu_first * dz * normal
    step_k = dz * normal if head_first else -dz * normal
    lps = np.eye(4)
    lps[:3, 0] = dx * row_dir
    lps[:3, 1] = -dy * col_dir
    lps[:3, 2] = step_k
    lps[:3, 3] = p0
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def write_segmentation(study: SyntheticStudy, nii_path: str | os.PathLike, *, head_first: bool = True) -> Path:
    """Write the label volume as ``<uid>.nii`` the way the competition stores its segmentations.

    The raw array has shape (W, H, Z): ``raw[:, ::-1, ::-1].transpose(1, 0, 2)`` is (H, W, Z) with z in
    InstanceNumber order (the public notebooks' recipe), for the series written with the same ``head_first``.
    The affine (RAS, mm, qform and sform code 1) maps raw voxels onto the DICOM geometry, so aligning through it
    needs no flips. Labels: 1..7 = C1..C7, 8 = T1, 9 = T2, 0 = background.
    """
    import nibabel as nib

    nii_path = Path(nii_path)
    nii_path.parent.mkdir(parents=True, exist_ok=True)
    labels = study.labels
    inst = labels if head_first else labels[::-1]  # InstanceNumber order along axis 0
    hwz = inst.transpose(1, 2, 0)  # (H, W, Z) in InstanceNumber order
    raw = np.ascontiguousarray(hwz[::-1, :, ::-1].transpose(1, 0, 2)).astype(np.uint8)
    affine = segmentation_affine(study, head_first)
    img = nib.Nifti1Image(raw, affine)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(nii_path))
    return nii_path

