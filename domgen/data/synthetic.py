"""The synthetic multi-site chest-CT suite: domgen's embedded default data.

A seeded generator of short chest-CT volumes in Hounsfield units: body outline (fat, muscle), optional
table, spine and ribs, two lungs near -850 HU with vessels and airways, and lesions. COVID sites get
ground-glass opacities (peripheral, bilateral, patchy, fuzzy) with consolidation inside them; the
non-COVID sites give solid tumours or pleural effusion for transfer learning. Every shape is a smooth
3D field, so neighbouring slices are correlated the way real slices are.

Sites differ the way hospitals do (Enshaei et al.'s Datasets A/B/C and MedSeg): noise level and
texture, reconstruction kernel, HU calibration, stored intensity (raw HU, int16 DICOM, 0..255 window),
matrix size, slice count and lesion mix.

The scanner model follows filtered back-projection: quantum noise has a ramp-shaped noise power spectrum
(NPS ~ |f| x MTF^2: no power at DC, a peak at mid frequencies, "grainy" rather than blurred white noise),
the kernel sets both the MTF of the anatomy and the NPS, and noise grows with the patient's width (fewer
photons through a wider body). Ground glass is hazy and heterogeneous with vessels visible through it,
sometimes with a superimposed reticulation (crazy paving); consolidation is near soft-tissue density with
air bronchograms. The default scale (0.25) gives 128x128 slices for a 512 matrix. ``write_suite`` stores each site in its own format and writes
the suite YAML that ``domgen.data.registry`` reads.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zlib
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

from domgen.data.case import CONSOLIDATION, GROUND_GLASS, HU, Case, IntensitySpace
from domgen.errors import DomgenError

# Bump when the generator's output changes, so ensure_synthetic_suite regenerates stale suites.
GENERATOR_VERSION = 3

# MedSeg's display window, in which sites C and D are stored (Radiopaedia cases come pre-windowed).
MEDSEG_WINDOW = IntensitySpace("windowed", level=-600.0, width=1500.0)

# Tissue values in HU (Hounsfield's scale; textbook values for the adult chest).
AIR_HU = -1000.0
LUNG_HU = -850.0
FAT_HU = -100.0
MUSCLE_HU = 45.0
SOFT_TISSUE_HU = 35.0
BLOOD_HU = 40.0
CANCELLOUS_BONE_HU = 250.0
CORTICAL_BONE_HU = 700.0
CSF_HU = 10.0
TABLE_HU = 150.0

# The scanner's storable range (12-bit CT with a -1024 intercept).
HU_MIN, HU_MAX = -1024.0, 3071.0

# Default matrix scale: 512 * 0.25 = 128 px slices (C's 630 matrix: 158 px), 2.7 mm pixels.
DEFAULT_SCALE = 0.25
# Half-width (mm) of the reference patient at which a site's ``noise_hu`` holds; wider patients are noisier.
REFERENCE_HALF_WIDTH_MM = 150.0

COVID_LABELS = {GROUND_GLASS: "ground_glass", CONSOLIDATION: "consolidation"}


@dataclass(frozen=True)
class SiteSpec:
    """One synthetic hospital: how its scanner images patients and how it stores the result.

    ``kernel`` is the reconstruction kernel: ``standard`` (mild blur), ``sharp`` (unsharp mask, i.e.
    high-frequency boost) or ``smooth`` (gaussian blur); ``kernel_px`` is its width in pixels, so the
    look is the same at every ``scale``. ``noise_hu`` is the noise std in a homogeneous region of the
    reference-width patient. Stored HU = ``hu_gain`` * true HU + ``hu_offset`` (calibration).
    ``consolidation_fraction`` is the mean share of the lesion volume that is consolidation;
    ``crazy_paving`` the share of patients whose ground glass carries a reticulation.
    """

    name: str
    description: str
    format: str  # nifti | dicom | slices
    lesion_kind: str  # covid | tumour | effusion
    patients: int
    slices_per_patient: int
    matrix: int  # at scale 1
    fov_mm: float
    z_range_mm: float  # physical extent covered by a patient's slices
    thorax_span: tuple[float, float]  # part of the thorax covered: 0 = apex, 1 = diaphragm
    noise_hu: float
    kernel: str
    kernel_px: float
    sharpen_amount: float = 0.0
    hu_gain: float = 1.0
    hu_offset: float = 0.0
    stored_intensity: IntensitySpace = HU
    table: bool = True
    consolidation_fraction: float = 0.2
    crazy_paving: float = 0.2
    lesion_burden: tuple[float, float] = (0.04, 0.25)  # range of the involved share of the lung
    binary_labels: bool = False
    lesion_labels: dict[int, str] = field(default_factory=lambda: dict(COVID_LABELS))

    def matrix_at(self, scale: float) -> int:
        return max(16, int(round(self.matrix * scale)))


SITES: dict[str, SiteSpec] = {
    "A": SiteSpec(
        name="A",
        description="Coronacases-like (Ma et al.): NIfTI, raw HU, 512 matrix, standard kernel, "
        "moderate noise, ground-glass dominated",
        format="nifti", lesion_kind="covid", patients=10, slices_per_patient=20,
        matrix=512, fov_mm=350.0, z_range_mm=150.0, thorax_span=(0.2, 0.95),
        noise_hu=15.0, kernel="standard", kernel_px=0.6,
        consolidation_fraction=0.08, crazy_paving=0.15, lesion_burden=(0.04, 0.25),
    ),
    "B": SiteSpec(
        name="B",
        description="COVID-CT-Rate-like: DICOM int16 with RescaleIntercept -1024, 512 matrix, sharp "
        "kernel, high noise, +30 HU calibration offset, more consolidation, fewer slices",
        format="dicom", lesion_kind="covid", patients=8, slices_per_patient=12,
        matrix=512, fov_mm=370.0, z_range_mm=180.0, thorax_span=(0.15, 0.95),
        noise_hu=35.0, kernel="sharp", kernel_px=1.0, sharpen_amount=0.5,
        hu_gain=0.97, hu_offset=30.0,
        consolidation_fraction=0.4, crazy_paving=0.5, lesion_burden=(0.08, 0.35),
    ),
    "C": SiteSpec(
        name="C",
        description="MedSeg Radiopaedia-like: NIfTI stored windowed to 0..255 (level -600, width 1500), "
        "630 matrix, smooth kernel, low noise, mixed lesions",
        format="nifti", lesion_kind="covid", patients=6, slices_per_patient=16,
        matrix=630, fov_mm=380.0, z_range_mm=160.0, thorax_span=(0.2, 0.95),
        noise_hu=8.0, kernel="smooth", kernel_px=1.3,
        stored_intensity=MEDSEG_WINDOW, table=False,
        consolidation_fraction=0.25, crazy_paving=0.3, lesion_burden=(0.05, 0.3),
    ),
    "D": SiteSpec(
        name="D",
        description="MedSeg 100-slices-like: folder of 8-bit PNG slices (level -600, width 1500), "
        "512 matrix, a few slices per patient, binary masks stored as {0,255}",
        format="slices", lesion_kind="covid", patients=8, slices_per_patient=4,
        matrix=512, fov_mm=360.0, z_range_mm=160.0, thorax_span=(0.3, 0.95),
        noise_hu=20.0, kernel="standard", kernel_px=0.8,
        stored_intensity=MEDSEG_WINDOW,
        consolidation_fraction=0.25, crazy_paving=0.3, lesion_burden=(0.05, 0.3),
        binary_labels=True, lesion_labels={1: "lesion"},
    ),
    "tumour": SiteSpec(
        name="tumour",
        description="MSD Task06-like lung tumours: NIfTI HU, solid nodules and masses, label 1 = tumour",
        format="nifti", lesion_kind="tumour", patients=8, slices_per_patient=12,
        matrix=512, fov_mm=350.0, z_range_mm=150.0, thorax_span=(0.2, 0.9),
        noise_hu=18.0, kernel="standard", kernel_px=0.6,
        lesion_labels={1: "tumour"},
    ),
    "effusion": SiteSpec(
        name="effusion",
        description="NSCLC pleural-effusion-like: NIfTI HU, fluid crescent at the dependent lung base, "
        "label 1 = effusion (outside the lung mask)",
        format="nifti", lesion_kind="effusion", patients=8, slices_per_patient=12,
        matrix=512, fov_mm=360.0, z_range_mm=120.0, thorax_span=(0.45, 1.0),
        noise_hu=18.0, kernel="standard", kernel_px=0.6,
        lesion_labels={1: "effusion"},
    ),
}


# --------------------------------------------------------------------------------------------------
# Smooth random fields and small shape helpers


def smooth_field(rng: np.random.Generator, shape: tuple[int, ...], step_mm: tuple[float, ...],
                 sigma_mm: float | tuple[float, ...]) -> np.ndarray:
    """Gaussian random field with unit variance and correlation length ``sigma_mm``.

    Drawn on a grid about sigma/2 apart and interpolated up, because blurring the full-resolution
    grid costs O(voxels * sigma) and the field has no detail finer than sigma anyway.
    """
    step = np.asarray(step_mm, dtype=float)
    sigma = np.broadcast_to(np.asarray(sigma_mm, dtype=float), step.shape)
    coarse_step = np.maximum(step, sigma / 2.0)
    pad = 3
    coarse_shape = tuple(int(np.ceil(n * s / c)) + 2 * pad for n, s, c in zip(shape, step, coarse_step))
    noise = rng.standard_normal(coarse_shape).astype(np.float32)
    coarse = ndimage.gaussian_filter(noise, sigma / coarse_step, mode="wrap")
    coarse /= coarse.std() + 1e-12
    values = coarse
    for axis, (n, s, c) in enumerate(zip(shape, step, coarse_step)):
        values = cubic_resample(values, axis, np.arange(n) * s / c + pad)
    return np.ascontiguousarray(values, dtype=np.float32)


def cubic_resample(values: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """Catmull-Rom interpolation of ``values`` along one axis at fractional ``positions``.

    Separable and gather-based, so resampling a volume costs a few passes over it (map_coordinates
    with order=3 was 10x slower here).
    """
    if np.allclose(positions, np.round(positions)):
        return np.take(values, np.round(positions).astype(int), axis=axis)
    base = np.floor(positions).astype(int)
    u = (positions - base).astype(np.float32)
    weights = (
        ((-u + 2.0) * u - 1.0) * u / 2.0,
        ((3.0 * u - 5.0) * u * u + 2.0) / 2.0,
        ((-3.0 * u + 4.0) * u + 1.0) * u / 2.0,
        (u - 1.0) * u * u / 2.0,
    )
    n = values.shape[axis]
    shape = [1] * values.ndim
    shape[axis] = -1
    out = 0.0
    for offset, w in zip((-1, 0, 1, 2), weights):
        out = out + np.take(values, np.clip(base + offset, 0, n - 1), axis=axis) * w.reshape(shape)
    return out


def smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def ellipse_radius(x: np.ndarray, y: np.ndarray, cx, cy, ax, ay) -> np.ndarray:
    """Normalised elliptic radius: < 1 inside the ellipse, 1 on it."""
    return np.sqrt(((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2)


def in_slice_distance(mask: np.ndarray, spacing: tuple[float, float]) -> np.ndarray:
    """Distance in mm from each inside voxel to the region's edge, measured within its own slice."""
    out = np.zeros(mask.shape, dtype=np.float32)
    for k in range(mask.shape[0]):
        if mask[k].any():
            out[k] = ndimage.distance_transform_edt(mask[k], sampling=spacing)
    return out


# --------------------------------------------------------------------------------------------------
# Anatomy


@dataclass
class Anatomy:
    """The noise-free volume and the region masks a case is built from."""

    hu: np.ndarray  # (Z, H, W) float32, true HU before the scanner
    body: np.ndarray  # bool: inside the skin
    lung_region: np.ndarray  # bool: both lungs (pleural space included), before effusion is carved out
    lung_sides: np.ndarray  # int8: 0 outside, 1 patient's right lung (image left), 2 left lung
    x: np.ndarray  # (1, 1, W) mm, patient's left is +x (image right)
    y: np.ndarray  # (1, H, 1) mm, posterior is +y (image bottom)
    t: np.ndarray  # (Z, 1, 1) thorax position, 0 apex .. 1 diaphragm
    lung_centres: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]  # (cx, cy, ax, ay)


def build_anatomy(site: SiteSpec, rng: np.random.Generator, n_slices: int, matrix: int) -> Anatomy:
    pixel = site.fov_mm / matrix
    z_step = site.z_range_mm / n_slices
    shape = (n_slices, matrix, matrix)
    step = (z_step, pixel, pixel)
    coords = (np.arange(matrix) - (matrix - 1) / 2.0) * pixel
    x = coords[None, None, :].astype(np.float32)
    y = coords[None, :, None].astype(np.float32)
    t0, t1 = site.thorax_span
    t = np.linspace(t0, t1, n_slices, dtype=np.float32)[:, None, None]

    # Patient habitus: body and lung sizes vary between patients, and the chest widens toward the base.
    size = rng.uniform(0.88, 1.08)
    widen = 0.9 + 0.12 * t
    body_ax = 158.0 * size * widen * rng.uniform(0.95, 1.05)
    body_ay = 112.0 * size * widen * rng.uniform(0.93, 1.05)
    body_cy = rng.uniform(-8.0, 4.0)
    wobble = smooth_field(rng, shape, step, (40.0, 30.0, 30.0))
    body_r = ellipse_radius(x, y, 0.0, body_cy, body_ax, body_ay) * (1.0 + 0.015 * wobble)
    body = body_r < 1.0
    fat_mm = rng.uniform(8.0, 22.0)
    fat = body & (body_r > 1.0 - fat_mm / body_ay)

    hu = np.full(shape, AIR_HU, dtype=np.float32)
    hu[body] = MUSCLE_HU
    hu[fat] = FAT_HU
    # Muscle is not perfectly uniform (fat marbling), a little texture.
    hu += np.where(body & ~fat, 6.0 * smooth_field(rng, shape, step, 4.0), 0.0).astype(np.float32)

    # Lungs: two ellipses, largest toward the base; the heart indents the left lung from the middle of
    # the thorax down, the liver dome lifts the right lung base.
    lung_growth = 0.62 + 0.38 * smoothstep((t - 0.0) / 0.7)
    lung_ax = 54.0 * size * lung_growth * rng.uniform(0.92, 1.08)
    lung_ay = 82.0 * size * lung_growth * rng.uniform(0.92, 1.08)
    lung_cy = body_cy - 4.0 + rng.uniform(-4.0, 4.0)
    lung_cx = 68.0 * size * widen
    edge_noise = smooth_field(rng, shape, step, (30.0, 18.0, 18.0))
    centres = []
    lung_sides = np.zeros(shape, dtype=np.int8)
    for side, sign, scale_x in ((1, -1.0, 1.04), (2, 1.0, 0.98)):
        cx = sign * lung_cx
        ax = lung_ax * scale_x
        r = ellipse_radius(x, y, cx, lung_cy, ax, lung_ay) * (1.0 + 0.03 * edge_noise)
        lung_sides[r < 1.0] = side
        centres.append((np.broadcast_to(cx, t.shape), np.broadcast_to(lung_cy, t.shape),
                        np.broadcast_to(ax, t.shape), np.broadcast_to(lung_ay, t.shape)))
    heart_size = smoothstep((t - 0.4) / 0.3)
    heart_r = ellipse_radius(x, y, 18.0, lung_cy - 24.0, 8.0 + 52.0 * heart_size, 8.0 + 44.0 * heart_size)
    heart = (heart_r < 1.0) & (heart_size > 0.05)
    dome = smoothstep((t - 0.82) / 0.18)
    liver_r = ellipse_radius(x, y, -lung_cx, lung_cy + 20.0, lung_ax * 1.3 * dome + 1e-3, lung_ay * 1.1 * dome + 1e-3)
    liver = liver_r < 1.0
    lung_sides[heart | liver] = 0
    # The mediastinum keeps the lungs apart.
    lung_sides[:, :, np.abs(coords) < 14.0] = 0
    # Real chest walls (fat, muscle, ribs) are >= ~15 mm thick: keep the lungs inside that wall.
    wall_mm = fat_mm + 12.0
    inside_wall = ellipse_radius(x, y, 0.0, body_cy, body_ax - wall_mm, body_ay - wall_mm) * (1.0 + 0.015 * wobble) < 1.0
    lung_sides[~inside_wall] = 0
    lung_region = lung_sides > 0

    hu[heart] = BLOOD_HU
    hu[liver & body] = 58.0
    # Descending aorta, left of the spine; the trachea above the carina.
    aorta = ellipse_radius(x, y, 20.0, body_cy + 0.55 * body_ay, 13.0, 13.0) < 1.0
    hu[aorta & body] = BLOOD_HU
    trachea = (ellipse_radius(x, y, 0.0, lung_cy - 20.0, 9.0, 8.0) < 1.0) & (t < 0.35)
    hu[trachea] = AIR_HU

    # Spine: vertebral body with a cortical shell, spinal canal behind it.
    spine_cy = body_cy + 0.76 * body_ay
    vertebra_r = ellipse_radius(x, y, 0.0, spine_cy, 19.0, 17.0)
    hu[vertebra_r < 1.0] = CORTICAL_BONE_HU
    hu[vertebra_r < 0.8] = CANCELLOUS_BONE_HU
    canal = ellipse_radius(x, y, 0.0, spine_cy + 26.0, 8.0, 8.0) < 1.0
    hu[canal] = CSF_HU
    posterior_arch = (ellipse_radius(x, y, 0.0, spine_cy + 26.0, 14.0, 13.0) < 1.0) & ~canal
    hu[posterior_arch & body] = CORTICAL_BONE_HU
    # Ribs: a band just outside the lungs, cut into arcs whose phase moves along z (ribs run obliquely).
    rib_r = ellipse_radius(x, y, 0.0, body_cy, body_ax - fat_mm - 6.0, body_ay - fat_mm - 6.0)
    theta = np.arctan2(y - body_cy, x)
    rib_phase = rng.uniform(0, 2 * np.pi) + 9.0 * t
    ribs = (np.abs(rib_r - 1.0) < 7.0 / body_ay) & (np.cos(7.0 * theta + rib_phase) > 0.55) & ~lung_region
    hu[ribs & body] = 550.0
    sternum = (ellipse_radius(x, y, 0.0, body_cy - body_ay + fat_mm + 10.0, 14.0, 5.0) < 1.0) & (t < 0.7)
    hu[sternum] = 400.0

    if site.table:
        table_top = body_cy + body_ay + rng.uniform(8.0, 20.0)
        curve = table_top - 0.0012 * x ** 2
        table = (y > curve) & (y < curve + 7.0) & (np.abs(x) < 0.85 * site.fov_mm / 2)
        hu = np.where(table, np.float32(TABLE_HU), hu)

    # Lung parenchyma: -850 HU with texture; dependent (posterior) lung is denser from gravity.
    texture = smooth_field(rng, shape, step, 5.0)
    posterior = np.clip((y - lung_cy) / lung_ay, -1.0, 1.0)
    parenchyma = LUNG_HU - 15.0 + rng.uniform(-25.0, 25.0) + 18.0 * texture + 35.0 * (posterior + 1.0) / 2.0
    hu = np.where(lung_region, parenchyma, hu).astype(np.float32)
    return Anatomy(hu=hu, body=body, lung_region=lung_region, lung_sides=lung_sides, x=x, y=y, t=t,
                   lung_centres=centres)


def hilum_distance(anatomy: Anatomy) -> np.ndarray:
    """Distance (mm) from each voxel to its lung's hilum, where vessels and bronchi enter."""
    dist = np.full(anatomy.hu.shape, 1e3, dtype=np.float32)
    for side, (cx, cy, ax, ay) in enumerate(anatomy.lung_centres, start=1):
        hx = cx - np.sign(cx) * 0.55 * ax
        d = np.sqrt((anatomy.x - hx) ** 2 + (anatomy.y - cy) ** 2)
        dist = np.where(anatomy.lung_sides == side, d, dist)
    return dist


def add_vessels_and_airways(anatomy: Anatomy, rng: np.random.Generator, step: tuple[float, ...],
                            hu: np.ndarray, solid: np.ndarray) -> np.ndarray:
    """Vessels as bright tubes, airways as dark tubes with a thin wall, thicker toward the hilum.

    A tube is where two independent smooth fields are both near zero (the intersection of two level
    surfaces is a curve), which gives branching, tortuous tubes at almost no cost. No airway is drawn
    through ``solid`` (tumours); consolidation keeps them, as air bronchograms.
    """
    shape = hu.shape
    lung = anatomy.lung_region
    hilum = hilum_distance(anatomy)
    # Two generations: large central vessels and a finer peripheral network.
    for sigma_mm, base, central in ((10.0, 0.07, 0.25), (5.0, 0.06, 0.0)):
        f1 = smooth_field(rng, shape, step, sigma_mm)
        f2 = smooth_field(rng, shape, step, sigma_mm)
        width = base + central * np.exp(-hilum / 35.0)
        vessel = np.exp(-(f1 ** 2 + f2 ** 2) / (2.0 * width ** 2))
        hu = np.where(lung, hu + (BLOOD_HU - hu) * np.clip(1.3 * vessel, 0.0, 1.0), hu)

    a1 = smooth_field(rng, shape, step, 16.0)
    a2 = smooth_field(rng, shape, step, 16.0)
    near_hilum = np.exp(-hilum / 30.0)
    airway = np.sqrt(a1 ** 2 + a2 ** 2) / (0.03 + 0.22 * near_hilum)
    wall = lung & ~solid & (airway < 1.0) & (airway >= 0.6)
    lumen = lung & ~solid & (airway < 0.6)
    hu = np.where(wall, np.float32(-250.0), hu)
    hu = np.where(lumen, np.float32(AIR_HU), hu)
    return hu.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# Lesions


def add_covid_lesions(site: SiteSpec, anatomy: Anatomy, rng: np.random.Generator,
                      step: tuple[float, ...], spacing: tuple[float, float]) -> np.ndarray:
    """Ground-glass opacities (peripheral, posterior, bilateral, patchy) with consolidation inside.

    Returns the lesion mask and updates ``anatomy.hu`` in place. Intensities follow the radiology
    definitions: ground glass -700..-300 HU (vessels still visible), consolidation -100..+50 HU.
    """
    shape = anatomy.hu.shape
    lung = anatomy.lung_region
    lesion = np.zeros(shape, dtype=np.uint8)
    if not lung.any():
        return lesion
    depth = in_slice_distance(lung, spacing)
    peripheral = np.exp(-depth / 15.0)
    cy = anatomy.lung_centres[0][1]
    ay = anatomy.lung_centres[0][3]
    posterior = np.clip((anatomy.y - cy) / ay, -1.0, 1.0)
    # Some slices stay clean: lesions fade out over a stretch of the thorax at one end.
    clean_share = rng.uniform(0.0, 0.3)
    z_frac = np.linspace(0.0, 1.0, shape[0], dtype=np.float32)[:, None, None]
    if rng.random() < 0.5:
        z_frac = 1.0 - z_frac
    present = smoothstep((z_frac - clean_share) / 0.12)

    patchy = smooth_field(rng, shape, step, 8.0)
    clusters = smooth_field(rng, shape, step, (40.0, 30.0, 30.0))
    score = (0.75 * patchy + 0.6 * clusters + 2.0 * peripheral + 0.5 * posterior
             - 8.0 * (1.0 - present))
    burden = rng.uniform(*site.lesion_burden)
    active = lung & (present > 0.5)
    if not active.any():
        return lesion
    threshold = np.quantile(score[active], 1.0 - burden)
    ggo_blend = smoothstep((score - threshold) / 0.5 + 0.5)  # 0.5 at the mask edge: fuzzy margins
    ggo = lung & (score > threshold)

    # Ground glass is hazy, not flat: its density wanders by tens of HU over a few mm.
    ggo_hu = rng.uniform(-620.0, -430.0) + 60.0 * smooth_field(rng, shape, step, 3.0)
    hu = anatomy.hu
    hu[:] = np.where(lung, hu + (ggo_hu - hu) * ggo_blend * (hu < ggo_hu), hu)
    if rng.random() < site.crazy_paving:
        # Crazy paving: thickened interlobular septa, a polygonal network of lines over the ground glass.
        septa = np.abs(smooth_field(rng, shape, step, (8.0, 4.0, 4.0))) < 0.18
        hu[:] = np.where(septa & lung, hu + 140.0 * ggo_blend, hu)
    lesion[ggo] = GROUND_GLASS

    share = float(np.clip(rng.normal(site.consolidation_fraction, 0.08), 0.0, 0.8))
    if share > 0.01 and ggo.any():
        dense = smooth_field(rng, shape, step, 10.0) + 1.5 * (score - threshold)
        c_threshold = np.quantile(dense[ggo], 1.0 - share)
        # Consolidation has sharper margins than ground glass.
        c_blend = smoothstep((dense - c_threshold) / 0.2 + 0.85)
        consolidation = ggo & (dense > c_threshold)
        c_hu = rng.uniform(-60.0, 30.0) + 15.0 * smooth_field(rng, shape, step, 4.0)
        hu[:] = np.where(lung, hu + (c_hu - hu) * c_blend * (hu < c_hu), hu)
        lesion[consolidation] = CONSOLIDATION
    return lesion


def add_tumours(anatomy: Anatomy, rng: np.random.Generator, step: tuple[float, ...],
                spacing: tuple[float, float]) -> np.ndarray:
    """One to three solid, lobulated nodules or masses (+20..+60 HU) inside the lungs."""
    shape = anatomy.hu.shape
    lung = anatomy.lung_region
    lesion = np.zeros(shape, dtype=np.uint8)
    depth = in_slice_distance(lung, spacing)
    z = (np.arange(shape[0], dtype=np.float32) * step[0])[:, None, None]
    lobulation = smooth_field(rng, shape, step, 6.0)
    for _ in range(int(rng.integers(1, 4))):
        radius = rng.uniform(9.0, 28.0)
        candidates = np.flatnonzero(depth > 0.5 * radius)
        if candidates.size == 0:
            continue
        k, i, j = np.unravel_index(rng.choice(candidates), shape)
        distance = np.sqrt((z - z[k]) ** 2 + (anatomy.y - anatomy.y[0, i, 0]) ** 2
                           + (anatomy.x - anatomy.x[0, 0, j]) ** 2)
        r = distance / (radius * (1.0 + 0.18 * lobulation))
        nodule = lung & (r < 1.0)
        blend = smoothstep((1.0 - r) / 0.1 + 0.75) * lung
        tumour_hu = rng.uniform(20.0, 60.0)
        anatomy.hu[:] = anatomy.hu + (tumour_hu - anatomy.hu) * blend * (anatomy.hu < tumour_hu)
        lesion[nodule] = 1
    return lesion


def add_effusion(anatomy: Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Pleural fluid (0..+20 HU) layering in the dependent (posterior) pleural space toward the base.

    In a supine patient the fluid settles posteriorly, so each slice shows a crescent along the back
    of the lung whose depth grows toward the diaphragm. It is removed from ``lung_region``.
    """
    lesion = np.zeros(anatomy.hu.shape, dtype=np.uint8)
    sides = [1, 2] if rng.random() < 0.5 else [int(rng.integers(1, 3))]
    fluid_hu = rng.uniform(2.0, 18.0)
    base = smoothstep((anatomy.t - rng.uniform(0.45, 0.7)) / 0.3)
    for side in sides:
        cx, cy, ax, ay = anatomy.lung_centres[side - 1]
        depth = rng.uniform(0.2, 0.55) * base  # share of the lung's height the fluid reaches
        # Level surface curving up along the chest wall gives the crescent (meniscus) shape.
        level = (anatomy.y - cy) / ay + 0.5 * ((anatomy.x - cx) / ax) ** 2
        fluid = (anatomy.lung_sides == side) & (level > 1.0 - 2.0 * depth) & (depth > 0.01)
        lesion[fluid] = 1
    anatomy.hu[lesion > 0] = fluid_hu
    anatomy.lung_region &= lesion == 0
    return lesion


# --------------------------------------------------------------------------------------------------
# The scanner: kernel, noise, calibration


KERNELS = ("standard", "sharp", "smooth")


def kernel_transfer(site: SiteSpec, shape: tuple[int, int]) -> np.ndarray:
    """The kernel's in-plane transfer function (MTF) on the rfft2 grid of a ``shape`` slice.

    standard/smooth: a gaussian blur of ``kernel_px`` pixels; sharp: an unsharp mask 1 + a(1 - G),
    which boosts high frequencies (edge overshoot in anatomy, fine grain in noise).
    """
    if site.kernel not in KERNELS:
        raise DomgenError(f"site {site.name!r} has unknown kernel {site.kernel!r}; use standard, sharp or smooth.")
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    gauss = np.exp(-2.0 * (np.pi * site.kernel_px) ** 2 * (fx ** 2 + fy ** 2))
    if site.kernel == "sharp":
        return 1.0 + site.sharpen_amount * (1.0 - gauss)
    return gauss


def ct_noise(site: SiteSpec, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Unit-std FBP-like noise per slice: white noise shaped to NPS ~ |f| x MTF^2 (the ramp filter's signature)."""
    white = rng.standard_normal(shape).astype(np.float32)
    fy = np.fft.fftfreq(shape[-2])[:, None]
    fx = np.fft.rfftfreq(shape[-1])[None, :]
    amplitude = np.sqrt(np.hypot(fx, fy)) * kernel_transfer(site, shape[-2:])
    noise = np.fft.irfft2(np.fft.rfft2(white) * amplitude, s=shape[-2:]).astype(np.float32)
    return noise / (noise.std(axis=(-2, -1), keepdims=True) + 1e-12)


def apply_scanner(site: SiteSpec, hu: np.ndarray, rng: np.random.Generator,
                  noise_scale: np.ndarray | float = 1.0) -> np.ndarray:
    """Reconstruction kernel on the anatomy, kernel-textured noise, then HU calibration and clipping.

    ``noise_scale`` (per slice, shape (Z, 1, 1), or a number) multiplies ``site.noise_hu``: 1 for the
    reference patient. Stored = clip(gain * (kernel(hu) + noise) + offset) to the 12-bit range.
    """
    in_plane = (0.0, site.kernel_px, site.kernel_px)
    kernel_transfer(site, hu.shape[-2:])  # checks the kernel name
    # The anatomy is filtered in image space (no wrap-around at the edges), the noise in Fourier space.
    if site.kernel == "sharp":
        image = hu + site.sharpen_amount * (hu - ndimage.gaussian_filter(hu, in_plane))
    else:
        image = ndimage.gaussian_filter(hu, in_plane)
    noise = ct_noise(site, hu.shape, rng) * (site.noise_hu * np.asarray(noise_scale, dtype=np.float32))
    image = site.hu_gain * (image + noise) + site.hu_offset
    return np.clip(image, HU_MIN, HU_MAX).astype(np.float32)


def patient_noise_scale(anatomy: "Anatomy") -> np.ndarray:
    """Per-slice noise factor: std grows ~ with (width / reference)^1.5 (attenuation over a longer path)."""
    cols = anatomy.body.any(axis=1)
    width = cols.sum(axis=-1).astype(np.float32) * float(anatomy.x[0, 0, 1] - anatomy.x[0, 0, 0]) / 2.0
    return ((np.maximum(width, 1.0) / REFERENCE_HALF_WIDTH_MM) ** 1.5)[:, None, None].astype(np.float32)


def case_rng(seed: int, site: SiteSpec, patient_index: int) -> np.random.Generator:
    # crc32, not hash(): Python salts str hashes per process, which would break reproducibility.
    return np.random.default_rng([int(seed), zlib.crc32(site.name.encode()), int(patient_index)])


def generate_case(site: SiteSpec, patient_index: int, seed: int = 0, scale: float = DEFAULT_SCALE,
                  slices_per_patient: int | None = None) -> Case:
    """One synthetic patient of ``site``: image in HU (float32), lesion and lung masks (uint8).

    The same (site, patient_index, seed, scale) always gives the same arrays. Pixel spacing is
    ``site.fov_mm / matrix`` so the field of view stays the same at every scale.
    """
    if scale <= 0:
        raise DomgenError(f"synthetic suite scale must be positive, got {scale}; use e.g. --scale 0.25.")
    n_slices = int(slices_per_patient or site.slices_per_patient)
    if n_slices < 1:
        raise DomgenError(f"slices_per_patient must be at least 1, got {n_slices}.")
    matrix = site.matrix_at(scale)
    pixel = site.fov_mm / matrix
    spacing = (pixel, pixel)
    step = (site.z_range_mm / n_slices, pixel, pixel)
    rng = case_rng(seed, site, patient_index)

    anatomy = build_anatomy(site, rng, n_slices, matrix)
    if site.lesion_kind == "covid":
        lesion = add_covid_lesions(site, anatomy, rng, step, spacing)
    elif site.lesion_kind == "tumour":
        lesion = add_tumours(anatomy, rng, step, spacing)
    elif site.lesion_kind == "effusion":
        lesion = add_effusion(anatomy, rng)
    else:
        raise DomgenError(f"site {site.name!r} has unknown lesion_kind {site.lesion_kind!r}; "
                          "use covid, tumour or effusion.")
    # Vessels are drawn after the lesions so they stay visible through ground glass.
    solid = lesion > 0 if site.lesion_kind == "tumour" else np.zeros(lesion.shape, dtype=bool)
    hu = add_vessels_and_airways(anatomy, rng, step, anatomy.hu, solid)
    image = apply_scanner(site, hu, rng, patient_noise_scale(anatomy))
    if site.binary_labels:
        lesion = (lesion > 0).astype(np.uint8)
    return Case(
        patient_id=f"{site.name}_p{patient_index:03d}",
        dataset=site.name,
        image=image,
        lesion=lesion.astype(np.uint8),
        spacing=spacing,
        slice_spacing=float(step[0]),
        intensity=HU,
        lung=anatomy.lung_region.astype(np.uint8),
        lesion_classes=dict(site.lesion_labels),
    )


# --------------------------------------------------------------------------------------------------
# Writing the suite


def to_window(image_hu: np.ndarray, window: IntensitySpace) -> np.ndarray:
    """HU -> 0..255 through the display window, rounded as an 8-bit export would be."""
    low = window.level - window.width / 2.0
    scaled = (image_hu - low) / window.width * 255.0
    return np.round(np.clip(scaled, 0.0, 255.0)).astype(np.float32)


def resolve_parameters(seed: int = 0, scale: float = DEFAULT_SCALE, patients: dict[str, int] | None = None,
                       slices_per_patient: int | None = None) -> dict:
    """The full, explicit parameter set of a suite (what generator.json records and hashes)."""
    if scale <= 0:
        raise DomgenError(f"synthetic suite scale must be positive, got {scale}; use e.g. scale=0.25.")
    patients = dict(patients or {})
    unknown = sorted(set(patients) - set(SITES))
    if unknown:
        raise DomgenError(f"unknown synthetic site(s) {', '.join(unknown)} in 'patients'; "
                          f"known sites: {', '.join(SITES)}.")
    counts = {name: int(patients.get(name, site.patients)) for name, site in SITES.items()}
    if any(n < 0 for n in counts.values()):
        raise DomgenError("synthetic suite 'patients' counts must be zero or more.")
    if slices_per_patient is not None and int(slices_per_patient) < 1:
        raise DomgenError(f"slices_per_patient must be at least 1, got {slices_per_patient}.")
    slices = {name: int(slices_per_patient or site.slices_per_patient) for name, site in SITES.items()}
    return {
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "scale": float(scale),
        "patients": counts,
        "slices_per_patient": slices,
    }


def parameters_hash(parameters: dict) -> str:
    # The site table is hashed too, so editing a SiteSpec invalidates suites generated before.
    sites = {name: asdict(site) for name, site in SITES.items()}
    blob = json.dumps({"parameters": parameters, "sites": sites}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dataset_entry(site: SiteSpec, scale: float) -> dict:
    """The suite-YAML entry describing how ``write_suite`` stores ``site``."""
    entry: dict = {"format": site.format, "root": site.name}
    if site.format == "nifti":
        entry.update(images="imagesTr", lesions="labelsTr", lungs="lungsTr")
    elif site.format == "dicom":
        entry.update(images="images", lesions="labelsTr", lungs="lungsTr")
    else:
        entry.update(images="images", lesions="masks", lungs="lungs")
    window = site.stored_intensity
    entry["intensity"] = ("hu" if window.kind == "hu"
                          else {"kind": "windowed", "level": window.level, "width": window.width})
    entry["patient_id"] = r"^(?P<patient>[A-Za-z0-9_-]+?)(_(?P<slice>\d+))?$"
    entry["lesion_labels"] = dict(site.lesion_labels)
    entry["lesion_kind"] = site.lesion_kind
    if site.format == "slices":
        # PNG slices carry no spacing, so the suite declares it.
        pixel = site.fov_mm / site.matrix_at(scale)
        entry["spacing"] = [pixel, pixel]
        entry["mask_scale"] = "auto"
    entry["description"] = f"synthetic: {site.description}"
    return entry


def stored_case(site: SiteSpec, case: Case) -> Case:
    """The case as the site stores it: windowed sites keep 0..255 instead of HU."""
    if site.stored_intensity.kind == "hu":
        return case
    return replace(case, image=to_window(case.image, site.stored_intensity), intensity=site.stored_intensity)


def write_suite(root: Path, seed: int = 0, scale: float = DEFAULT_SCALE, patients: dict[str, int] | None = None,
                slices_per_patient: int | None = None, progress: bool = False) -> Path:
    """Generate every site and store it in its own format under ``root/<site>/``.

    Also writes ``root/suite.yaml`` and ``root/generator.json`` (parameters and their hash). Everything
    is written to a temporary folder beside ``root`` and renamed into place at the end, so an
    interrupted run never leaves a half-written suite. Returns the path of suite.yaml.
    """
    from domgen.data.readers import WRITERS
    from domgen.data.spec import parse_suite

    root = Path(root).expanduser().resolve()
    parameters = resolve_parameters(seed, scale, patients, slices_per_patient)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        suite = {"name": "synthetic", "datasets": {}}
        for name, site in SITES.items():
            if parameters["patients"][name] > 0:
                suite["datasets"][name] = dataset_entry(site, parameters["scale"])
        suite_file = staging / "suite.yaml"
        suite_file.write_text(
            "# Generated by domgen.data.synthetic.write_suite; regenerate rather than edit.\n"
            + yaml.safe_dump(suite, sort_keys=False), encoding="utf-8")
        specs = parse_suite(suite_file).datasets
        jobs = [(name, i) for name in specs for i in range(parameters["patients"][name])]
        if progress:
            from tqdm import tqdm

            jobs = tqdm(jobs, desc="generating synthetic suite", unit="patient")
        for name, index in jobs:
            site = SITES[name]
            case = generate_case(site, index, parameters["seed"], parameters["scale"],
                                 parameters["slices_per_patient"][name])
            WRITERS[site.format](stored_case(site, case), specs[name])
        record = {"parameters": parameters, "hash": parameters_hash(parameters)}
        (staging / "generator.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        replace_folder(staging, root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root / "suite.yaml"


def replace_folder(new: Path, target: Path) -> None:
    """Put ``new`` at ``target``, moving any old folder aside first (a folder cannot be os.replace'd
    onto a non-empty one)."""
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    try:
        # A few tries: another process generating the same suite may put its copy there meanwhile.
        for attempt in range(3):
            if target.exists():
                os.replace(target, old / f"{target.name}-{attempt}")
            try:
                os.replace(new, target)
                return
            except OSError:
                if attempt == 2:
                    raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def default_data_root() -> Path:
    return Path(os.environ.get("DOMGEN_DATA", "./domgen-data")).expanduser() / "synthetic"


def ensure_synthetic_suite(root: Path | None = None, seed: int = 0, scale: float = DEFAULT_SCALE,
                           patients: dict[str, int] | None = None, slices_per_patient: int | None = None,
                           progress: bool = False) -> Path:
    """The suite.yaml of the synthetic suite in ``root`` (default ``$DOMGEN_DATA/synthetic`` or
    ``./domgen-data/synthetic``), generating it when missing or made with other parameters."""
    root = Path(root).expanduser() if root is not None else default_data_root()
    parameters = resolve_parameters(seed, scale, patients, slices_per_patient)
    if suite_is_current(root, parameters):
        return root.resolve() / "suite.yaml"
    return write_suite(root, **{k: parameters[k] for k in ("seed", "scale", "patients")},
                       slices_per_patient=slices_per_patient, progress=progress)


def suite_is_current(root: Path, parameters: dict) -> bool:
    record_file = root / "generator.json"
    if not (record_file.is_file() and (root / "suite.yaml").is_file()):
        return False
    try:
        record = json.loads(record_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("hash") == parameters_hash(parameters)
