"""kit: a competition kit for the RSNA 2022 Cervical Spine Fracture Detection challenge."""

__version__ = "0.1.0"
