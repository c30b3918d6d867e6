"""The classifier's input recipe: how a vertebra's crop is cut and how a cached crop becomes the model's input.

One `ClsRecipe` is built from a classifier config (`ClsConfig.recipe()`, the only place its values come from:
the defaults are `ClsDataConfig`'s) and used by `kit crops` (`kit.stage2.crop_cache`), the training dataset and
task, inference (`kit.stage2.infer.classify_study`) and `kit explain`, so the crops a model trained on and the
crops it is given at inference are cut by the same call with the same values.

    recipe = load_config("demo_cls").recipe()
    stacks, found, reasons = recipe.crop_study(hu, labels, extents, dz=dz)   # uint8 (7, T, C, S, S)
    x = recipe.model_input(torch.from_numpy(stacks))                         # float32 in [0, 1]

numpy only at import; `model_input` and `reverse` import the torch side (`kit.stage2.data`) when called.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..constants import N_VERTEBRAE, VERTEBRAE
from .crops import check_windows, crop_vertebra_stack, stack_channel_names


@dataclass(frozen=True)
class ClsRecipe:
    """The crop geometry and channel layout of one classifier (hashable: equal recipes cut equal crops).

    Attributes:
        n_slices: T, slices per vertebra spread evenly over its z-range, head to feet.
        n_neighbours: n; each slice is stacked with its +-n neighbours (2n+1 image channels per window).
        neighbour_mm: spacing of those neighbours in mm (stage 1's rounding); None: adjacent slices.
        size: S, the crop's in-plane pixels.
        windows: HU windows stacked as channels, in order.
        margin: widening of the in-plane box on each side, as a fraction of its size.
        with_mask: the vertebra's own mask as the last channel.
    """

    n_slices: int
    n_neighbours: int
    neighbour_mm: float | None
    size: int
    windows: tuple[str, ...]
    margin: float
    with_mask: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "windows", check_windows(self.windows))

    @classmethod
    def from_data(cls, data) -> ClsRecipe:
        """The recipe of a `ClsDataConfig` (its `image_size` is `size`)."""
        return cls(n_slices=int(data.n_slices), n_neighbours=int(data.n_neighbours),
                   neighbour_mm=None if data.neighbour_mm is None else float(data.neighbour_mm),
                   size=int(data.image_size), windows=tuple(data.windows), margin=float(data.margin),
                   with_mask=bool(data.with_mask))

    @property
    def channel_names(self) -> list[str]:
        """The C channel names of a slice: window-major neighbours (`bone-2` ... `bone+2`), then `mask`."""
        return stack_channel_names(self.windows, self.n_neighbours, self.with_mask)

    @property
    def n_channels(self) -> int:
        """C, channels of each slice: (2n+1) per window, plus the mask."""
        return (2 * self.n_neighbours + 1) * len(self.windows) + int(self.with_mask)

    def crop_vertebra(self, hu: np.ndarray, labels: np.ndarray, extent, *, dz: float,
                      scale: tuple[float, float] | None = None) -> np.ndarray:
        """One vertebra's uint8 (T, C, S, S) stack (`kit.stage2.crops.crop_vertebra_stack`)."""
        return crop_vertebra_stack(hu, labels, extent, scale=scale, dz=dz, **self._geometry())

    def crop_study(self, hu: np.ndarray, labels: np.ndarray, extents: dict, *, dz: float,
                   dropped: dict[str, str] | None = None, scale: tuple[float, float] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, dict[str, str]]:
        """C1..C7 of one study (`crop_vertebra` each); a vertebra not found is zeros, never left out.

        Args:
            hu: (Z, H, W) original HU volume.
            labels: (Z, s, s) prepared-grid labels.
            extents: {"C1": VertebraExtent, ...} of the vertebrae found (`SegResult.extents`).
            dz: the series' slice spacing in mm.
            dropped: {name: reason} of the vertebrae the clean-up removed (`SegResult.dropped`), for the reasons.
            scale: (sy, sx) original pixels per prepared pixel; None: from the two shapes.

        Returns:
            stacks: uint8 (7, T, C, S, S) in C1..C7 order, zeros for a vertebra not found;
            found: bool (7,);
            reasons: {name: why} for each vertebra not found: "dropped by the clean-up: <reason>" or "not
            found by the segmenter".
        """
        dropped = dropped or {}
        stacks = np.zeros((N_VERTEBRAE, self.n_slices, self.n_channels, self.size, self.size), np.uint8)
        found = np.zeros(N_VERTEBRAE, bool)
        reasons: dict[str, str] = {}
        for i, name in enumerate(VERTEBRAE):
            if name not in extents:
                reasons[name] = (f"dropped by the clean-up: {dropped[name]}" if name in dropped
                                 else "not found by the segmenter")
                continue
            stacks[i] = self.crop_vertebra(hu, labels, extents[name], dz=dz, scale=scale)
            found[i] = True
        return stacks, found, reasons

    def model_input(self, image, intensity=None):
        """The model's float32 input from cached uint8 stacks (`kit.stage2.data.stack_input`), an intensity
        change (training) on the image channels only."""
        from .data import stack_input

        return stack_input(image, intensity, mask_channel=self.with_mask)

    def reverse(self, image: np.ndarray) -> np.ndarray:
        """A stack read feet to head: its slices and each slice's neighbour channels (`kit.stage2.data.reverse_stack`)."""
        from .data import reverse_stack

        return reverse_stack(image, self.n_neighbours, self.with_mask)

    def _geometry(self) -> dict:
        return asdict(self)
