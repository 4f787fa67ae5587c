"""Typed, strict configuration of the dataset factory.

One pydantic model per YAML section, unknown keys rejected, physical limits in the
types and units in the field names.  A ``datasets.yaml`` has three top-level keys::

    seed: 2024                 # one seed for the whole file
    defaults: {...}            # a DatasetSpec shared by every dataset
    datasets:                  # name -> n_images plus any section to override
      train: {n_images: 29838}
      test_d075: {n_images: 2570, particles: {diffusion_um2_s: 0.75}}

Per-dataset overrides are merged key by key into the defaults, then validated, so an
error is reported at the path where the bad value was written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_serializer, model_validator

from .errors import ConfigError

PositiveFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegativeFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
FiniteFloat = Annotated[float, Field(allow_inf_nan=False)]
GapMs = Annotated[float, Field(ge=0, le=3_600_000, allow_inf_nan=False)]  # between frames: up to an hour (time-lapse)

# `output.trajectory_step: auto` keeps every dwell up to this many bytes of trajectories
# per store row: 16 rows still fill a 64 MiB batch, and the largest row of the
# repository's configs (7.2 kB) is far below it; a 512 x 512 px, 64-particle row (201 MB)
# is far above it.
AUTO_DWELL_MAX_BYTES = 4 * 2**20


class StrictModel(BaseModel):
    """Base of every config section: unknown keys and silent coercions are errors."""

    # strict: "24" is not an int and "yes" is not a bool (ints still pass as floats).
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, strict=True)


# --- distributions --------------------------------------------------------------------


# Keys that only one variant has: `{low: 1, high: 2}` means `type: uniform`.
_TAG_OF_KEY = {
    "value": "fixed", "low": "uniform", "high": "uniform", "std": "normal", "n": "fixed",
    "max": "poisson", "margin_px": "uniform", "x_px": "fixed", "y_px": "fixed",
    "gain_adu_per_photon": "pmt", "excess_noise_factor": "pmt", "offset_adu": "pmt",
}


def infer_tag(value: Any) -> Any:
    """Fill in a variant's missing ``type`` from the keys written, when they tell.

    Parameters
    ----------
    value : Any
        A section as written in YAML.

    Returns
    -------
    Any
        ``value`` with ``type`` added when it is a mapping without one whose keys belong
        to one variant only (``{low: 1, high: 2}`` -> ``type: uniform``); else ``value``
        unchanged.
    """
    if isinstance(value, dict) and "type" not in value:
        tags = {_TAG_OF_KEY[k] for k in value if k in _TAG_OF_KEY}
        if len(tags) == 1:
            return {"type": tags.pop(), **value}
    return value


def _scalar_is_fixed(value: Any) -> Any:
    # `diffusion_um2_s: 0.75` is shorthand for `{type: fixed, value: 0.75}`.
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"type": "fixed", "value": value}
    return value


class Fixed(StrictModel):
    """Every draw is ``value`` (in the field's unit)."""

    type: Literal["fixed"] = "fixed"
    value: NonNegativeFloat


class Uniform(StrictModel):
    """Uniform on [``low``, ``high``] (in the field's unit)."""

    type: Literal["uniform"] = "uniform"
    low: NonNegativeFloat
    high: NonNegativeFloat

    @model_validator(mode="after")
    def _ordered(self) -> "Uniform":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class LogUniform(StrictModel):
    """log(value) uniform on [log low, log high] (a spread over decades).

    D spans one to two decades in real recordings (SPEC, Real recordings).  One uniform
    per draw, as ``uniform`` takes, so the streams after it are the same.
    """

    type: Literal["log_uniform"] = "log_uniform"
    low: PositiveFloat
    high: PositiveFloat

    @model_validator(mode="after")
    def _ordered(self) -> "LogUniform":
        if self.high <= self.low:
            raise ValueError(f"high ({self.high}) must be > low ({self.low})")
        return self


NonNegativeDistribution = Annotated[Union[Fixed, Uniform, LogUniform], Field(discriminator="type")]


class FixedZ(StrictModel):
    """Every particle starts at ``value`` um."""

    type: Literal["fixed"] = "fixed"
    value: FiniteFloat = 0.0


class UniformZ(StrictModel):
    """Uniform on [``low``, ``high``] um."""

    type: Literal["uniform"] = "uniform"
    low: FiniteFloat
    high: FiniteFloat

    @model_validator(mode="after")
    def _ordered(self) -> "UniformZ":
        if self.high < self.low:
            raise ValueError(f"high ({self.high}) must be >= low ({self.low})")
        return self


class NormalZ(StrictModel):
    """Normal with mean ``mean`` um and standard deviation ``std`` um."""

    type: Literal["normal"] = "normal"
    mean: FiniteFloat = 0.0
    std: NonNegativeFloat


ZDistribution = Annotated[Union[FixedZ, UniformZ, NormalZ], Field(discriminator="type")]


class FixedCount(StrictModel):
    """Exactly ``n`` particles per image (per movie, per stack)."""

    type: Literal["fixed"] = "fixed"
    n: Annotated[int, Field(ge=0, le=4096)] = 1


class PoissonCount(StrictModel):
    """Poisson(``mean``) particles per image (per movie, per stack), capped at ``max``."""

    type: Literal["poisson"] = "poisson"
    mean: NonNegativeFloat
    max: Annotated[int, Field(ge=1, le=4096)]


CountDistribution = Annotated[Union[FixedCount, PoissonCount], Field(discriminator="type")]


class UniformStart(StrictModel):
    """Start uniformly inside the image, keeping ``margin_px`` from every edge."""

    type: Literal["uniform"] = "uniform"
    margin_px: NonNegativeFloat = 3.0


class FixedStart(StrictModel):
    """Every particle starts at one point (pixel-centre origin): calibration, tests."""

    type: Literal["fixed"] = "fixed"
    x_px: FiniteFloat
    y_px: FiniteFloat


StartDistribution = Annotated[Union[UniformStart, FixedStart], Field(discriminator="type")]


# --- sections ---------------------------------------------------------------------------


class ImageSpec(StrictModel):
    """Image size (pixels) and pixel size (um)."""

    height_px: Annotated[int, Field(ge=1, le=4096)] = 24
    width_px: Annotated[int, Field(ge=1, le=4096)] = 25
    # Upper limits here and below: far beyond any real two-photon setup, so only a slip
    # (a unit, a typo, `inf`) is refused; command-line flags take the same limits.
    pixel_size_um: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)] = 0.07


class ScanSpec(StrictModel):
    """Laser timing: the beam dwells ``dwell_us`` per pixel along x, then retraces."""

    dwell_us: Annotated[float, Field(gt=0, le=10_000, allow_inf_nan=False)] = 2.0
    line_retrace_ms: Annotated[float, Field(ge=0, le=1000, allow_inf_nan=False)] = 1.1
    substeps_per_dwell: Annotated[int, Field(ge=1, le=64)] = 1
    direction: Literal["unidirectional", "bidirectional"] = "unidirectional"


class PSFSpec(StrictModel):
    """3D Gaussian PSF (two-photon excitation volume) and the laser's focal plane."""

    sigma_xy_um: PositiveFloat = 0.21
    sigma_z_um: PositiveFloat = 1.36
    focal_z_um: FiniteFloat = 0.0


class BlinkingSpec(StrictModel):
    """Quantum-dot blinking: on / off periods with power-law durations (absent: always on).

    Each particle switches between on (emitting) and off (dark), every on and off
    duration drawn afresh from a truncated power law
    ``P(t) ~ t^-(1 + alpha)`` on ``[t_min, t_max]``, the on-times also damped by
    ``exp(-t / on_cutoff_s)``.  An off particle gives no Eq. 1 signal.  The state runs
    in continuous time along the scan (retraces and flybacks included), independent of
    the laser (the defaults come from dots under steady illumination).

    Defaults: alpha_on = alpha_off = 0.5 (exponents 1 + alpha near 3/2: Kuno et al.,
    J. Chem. Phys. 112, 3117, 2000 and 115, 1028, 2001; Frantsuzov et al., Nat. Phys.
    4, 519, 2008); t_min 0.2 ms, the shortest times resolved in those measurements
    (hundreds of us); t_max 100 s, beyond the tens of seconds that dark periods last
    (Frantsuzov 2008) and beyond any movie here; an on-time cut-off of 2 s, of the order
    of the seconds measured for the on-time truncation (Kuno 2001).  With these laws a
    dot is on about 11 % of the time (``factory.blinking.on_probability``).
    """

    # Power-law exponents minus 1, on and off: 0.5 (Kuno 2000, 2001; Frantsuzov 2008).
    alpha_on: Annotated[float, Field(gt=0, le=3, allow_inf_nan=False)] = 0.5
    alpha_off: Annotated[float, Field(gt=0, le=3, allow_inf_nan=False)] = 0.5
    # Shortest period: 0.2 ms, the hundreds of us those measurements resolve.
    t_min_ms: Annotated[float, Field(gt=0, le=3_600_000, allow_inf_nan=False)] = 0.2
    # Longest period: 100 s, beyond the tens of seconds dark periods last (Frantsuzov 2008).
    t_max_s: Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)] = 100.0
    # Exponential cut-off of the on-times: 2 s, the order of the truncation times
    # measured (Kuno 2001; shorter at higher excitation).  None: on-times follow the
    # truncated power law alone, as the off-times do.
    on_cutoff_s: Optional[Annotated[float, Field(gt=0, le=86_400, allow_inf_nan=False)]] = 2.0
    # Probability that a particle is on at the movie's start, where its first duration
    # begins; None: the long-run fraction of time on, mean_on / (mean_on + mean_off).
    p_on_start: Optional[Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]] = None

    @model_validator(mode="after")
    def _times_ordered(self) -> "BlinkingSpec":
        if self.t_max_s * 1000 <= self.t_min_ms:
            raise ValueError(f"t_max_s ({self.t_max_s} s) must be longer than t_min_ms ({self.t_min_ms} ms)")
        # Shorter cut-offs would make the sampler reject almost every draw.
        if self.on_cutoff_s is not None and self.on_cutoff_s * 1000 < self.t_min_ms:
            raise ValueError(f"on_cutoff_s ({self.on_cutoff_s} s) must be at least t_min_ms ({self.t_min_ms} ms)")
        return self


class ParticleSpec(StrictModel):
    """How many particles, their D (um^2/s), brightness (N_qd), start and blinking."""

    count: CountDistribution = FixedCount()
    diffusion_um2_s: NonNegativeDistribution = Uniform(low=0.75, high=1.75)
    n_qd: NonNegativeDistribution = Fixed(value=10.0)
    xy_start: StartDistribution = UniformStart()
    z_start_um: ZDistribution = FixedZ()
    blinking: Optional[BlinkingSpec] = None  # None: always on (the paper)

    @model_serializer(mode="wrap")
    def _without_blinking_off(self, handler):
        # Blinking off leaves no trace in a dump: stored configs and dataset hashes stay
        # those of every store built before blinking existed.
        d = handler(self)
        if self.blinking is None:
            d.pop("blinking", None)
        return d

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = dict(data)
            for key in ("diffusion_um2_s", "n_qd"):
                if key in data:
                    data[key] = _scalar_is_fixed(data[key])
            for key in ("count", "diffusion_um2_s", "n_qd", "xy_start", "z_start_um"):
                if key in data:
                    data[key] = infer_tag(data[key])
            if "z_start_um" in data and isinstance(data["z_start_um"], (int, float)):
                data["z_start_um"] = {"type": "fixed", "value": data["z_start_um"]}
            if isinstance(data.get("count"), int) and not isinstance(data["count"], bool):
                data["count"] = {"type": "fixed", "n": data["count"]}
        return data

    @property
    def max_particles(self) -> int:
        """Most particles an image (movie, stack) can hold: the P of the stored arrays."""
        return self.count.n if isinstance(self.count, FixedCount) else self.count.max


class BackgroundSpec(StrictModel):
    """Background photons per pixel (N_bkg of Eq. 1)."""

    n_bkg: NonNegativeFloat = 8.4


class PoissonDetector(StrictModel):
    """Photon counting: recorded count ~ Poisson(expected photons) (the paper)."""

    type: Literal["poisson"] = "poisson"


class PMTDetector(StrictModel):
    """Photomultiplier: each photon is amplified by a gamma-distributed gain.

    The output is ``offset_adu + sum of n gains`` with n ~ Poisson(expected); a gain has
    mean ``gain_adu_per_photon`` and variance ``gain**2 * (excess_noise_factor - 1)``, so
    the output variance is ``gain**2 * excess_noise_factor * expected`` (plus
    ``read_noise_adu**2``).
    """

    type: Literal["pmt"] = "pmt"
    gain_adu_per_photon: PositiveFloat = 1.0
    excess_noise_factor: Annotated[float, Field(gt=1.0, le=10.0)] = 1.5
    offset_adu: NonNegativeFloat = 0.0
    # Gaussian noise of the amplifier and digitiser (ADU, standard deviation), added to
    # every pixel before rounding; values below 0 ADU are clipped, as an ADC does.
    read_noise_adu: Annotated[float, Field(ge=0.0, le=1000.0)] = 0.0

    @model_serializer(mode="wrap")
    def _without_read_noise_off(self, handler):
        # No read noise leaves no trace in a dump: stored configs and dataset hashes stay
        # those of every PMT store built before it was a setting.
        d = handler(self)
        if self.read_noise_adu == 0.0:
            d.pop("read_noise_adu", None)
        return d


DetectorSpec = Annotated[Union[PoissonDetector, PMTDetector], Field(discriminator="type")]


class OutputSpec(StrictModel):
    """What a store keeps beside the images, and how it is chunked and compressed."""

    expected: bool = True
    trajectories: bool = True
    chunk_images: Annotated[int, Field(ge=64, le=65536)] = 256
    # Time resolution of the stored trajectories (``output.trajectories``): "dwell" keeps
    # every pixel step (P x H x W x 3 float32 per frame: 200 MB for 512 x 512 px and 64
    # particles), "line" the first pixel step of every line (in time order), "frame" the
    # first pixel step of every frame (of every plane for stacks); a sample equals the
    # dwell trajectory at that step.  "auto" is "dwell" while one store row's dwell
    # trajectories take at most AUTO_DWELL_MAX_BYTES (every small-image config, whose
    # stores and hashes stay as they were), "line" beyond.
    trajectory_step: Literal["auto", "dwell", "line", "frame"] = "auto"
    # HDF5 only (Zarr stores use Blosc-LZ4): gzip (deflate + shuffle) opens in every HDF5
    # reader; blosc-lz4 is faster to read and write but needs the Blosc filter plugin.
    compression: Literal["gzip", "blosc-lz4"] = "gzip"


class MovieSpec(StrictModel):
    """Recordings of consecutive raster frames.

    Particles live in a region larger than the field of view (``margin_um`` beyond every
    edge) with reflecting walls, so they enter and leave the field as in a real recording
    and a particle just outside still lights the edge pixels.  They keep walking through
    every line retrace and the flyback between frames.  A uniform ``xy_start`` covers
    the whole region (``margin_px`` does not apply).
    """

    n_frames: Annotated[int, Field(ge=1, le=100000)]
    frame_flyback_ms: Optional[GapMs] = None  # None: one line retrace
    margin_um: NonNegativeFloat = 1.0
    walls: Literal["reflecting"] = "reflecting"


class StackSpec(StrictModel):
    """z-stacks: the focal plane steps through ``n_planes`` planes ``z_step_um`` apart.

    Each plane is a full raster frame with the scan's dwell and retrace timing, and a
    stage or piezo move of ``plane_flyback_ms`` separates the planes.  Particles keep
    their 3D walk through the whole stack, so a particle that moves is recorded at a
    different time in every plane.  The planes are centred on ``psf.focal_z_um`` unless
    ``first_plane_um`` places the first one.
    """

    n_planes: Annotated[int, Field(ge=1, le=4096)]
    z_step_um: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False)]
    plane_flyback_ms: Optional[GapMs] = None  # None: one line retrace
    first_plane_um: Optional[FiniteFloat] = None


class DatasetSpec(StrictModel):
    """Everything that defines one dataset except its size."""

    image: ImageSpec = ImageSpec()
    scan: ScanSpec = ScanSpec()
    psf: PSFSpec = PSFSpec()
    particles: ParticleSpec = ParticleSpec()
    background: BackgroundSpec = BackgroundSpec()
    detector: DetectorSpec = PoissonDetector()
    output: OutputSpec = OutputSpec()
    movie: Optional[MovieSpec] = None  # a set of movies instead of independent images
    stack: Optional[StackSpec] = None  # a set of z-stacks instead of independent images

    @property
    def frames_per_movie(self) -> int:
        """Raster frames simulated from one random stream.

        A movie's frames, a stack's planes, 1 for independent images.
        """
        if self.stack is not None:
            return self.stack.n_planes
        return self.movie.n_frames if self.movie is not None else 1

    @property
    def planes(self) -> int:
        """Raster frames per store row.

        A stack's planes; 1 for images and movies, whose frames are rows of their own.
        """
        return self.stack.n_planes if self.stack is not None else 1

    @property
    def flyback_ms(self) -> float:
        """Time (ms) from the last pixel of a frame (or plane) to the first of the next."""
        gap = self.movie.frame_flyback_ms if self.movie is not None else (
            self.stack.plane_flyback_ms if self.stack is not None else None)
        return self.scan.line_retrace_ms if gap is None else gap

    @property
    def plane_z_um(self) -> tuple[float, ...]:
        """Focal z (um) of every plane of a stack (one plane, ``psf.focal_z_um``, otherwise)."""
        st = self.stack
        if st is None:
            return (self.psf.focal_z_um,)
        first = self.psf.focal_z_um - 0.5 * (st.n_planes - 1) * st.z_step_um \
            if st.first_plane_um is None else st.first_plane_um
        return tuple(first + k * st.z_step_um for k in range(st.n_planes))

    @property
    def chunk_rows(self) -> int:
        """Store rows per chunk.

        Images and movies: ``output.chunk_images`` rounded up to whole movies, so chunks,
        batches and shards always hold whole movies.  Stacks: whole stacks of about
        ``chunk_images`` planes.
        """
        if self.stack is not None:
            return max(1, -(-self.output.chunk_images // self.stack.n_planes))
        f = self.frames_per_movie
        return -(-self.output.chunk_images // f) * f

    @property
    def trajectory_resolution(self) -> Literal["dwell", "line", "frame"]:
        """``output.trajectory_step`` with "auto" resolved.

        "auto" is "dwell" while one row's per-dwell trajectories take at most
        ``AUTO_DWELL_MAX_BYTES``, else "line".
        """
        step = self.output.trajectory_step
        if step != "auto":
            return step
        dwell_bytes = self.particles.max_particles * self.planes * self.image.height_px * self.image.width_px * 12
        return "dwell" if dwell_bytes <= AUTO_DWELL_MAX_BYTES else "line"

    @property
    def trajectory_stride(self) -> int:
        """Pixel steps from one stored trajectory sample to the next (1, W or H * W).

        Samples are taken at the steps ``0, stride, 2 * stride, ...`` of every frame.
        """
        h, w = self.image.height_px, self.image.width_px
        return {"dwell": 1, "line": w, "frame": h * w}[self.trajectory_resolution]

    @property
    def trajectory_samples(self) -> int:
        """Trajectory samples per store row (T of the ``trajectories`` array)."""
        return self.planes * self.image.height_px * self.image.width_px // self.trajectory_stride

    @model_validator(mode="before")
    @classmethod
    def _detector_tag(cls, data: Any) -> Any:
        if isinstance(data, dict) and "detector" in data:
            data = {**data, "detector": infer_tag(data["detector"])}
        return data

    @model_validator(mode="after")
    def _start_fits(self) -> "DatasetSpec":
        if self.movie is not None and self.stack is not None:
            raise ValueError("a dataset is movies or stacks, not both (remove movie or stack)")
        start = self.particles.xy_start
        h, w = self.image.height_px, self.image.width_px
        if isinstance(start, UniformStart) and self.movie is None:
            if w - 1 - 2 * start.margin_px < 0 or h - 1 - 2 * start.margin_px < 0:
                raise ValueError(
                    f"particles.xy_start.margin_px = {start.margin_px} leaves no room in a "
                    f"{h} x {w} px image (needs 2 * margin_px <= min(height, width) - 1)"
                )
        return self


class Dataset(DatasetSpec):
    """A named dataset and its size.

    The size is ``n_images``, or for movies ``n_movies`` (then ``n_images`` =
    ``n_movies * movie.n_frames`` frames), or for stacks ``n_stacks`` (the store's rows:
    ``n_images`` = ``n_stacks``).  After validation all that apply are set.
    """

    name: str
    n_images: Annotated[int, Field(ge=1, le=10**10)]
    n_movies: Optional[Annotated[int, Field(ge=1, le=10**9)]] = None
    n_stacks: Optional[Annotated[int, Field(ge=1, le=10**9)]] = None

    @model_validator(mode="before")
    @classmethod
    def _rows_of_stacks(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("n_stacks") is not None:
            if data.get("stack") is None:
                raise ValueError("n_stacks needs a stack section (n_planes, z_step_um)")
            if "n_images" in data and data["n_images"] != data["n_stacks"]:
                raise ValueError(f"n_images ({data['n_images']}) of a stack dataset is n_stacks; give one of them")
            data = {**data, "n_images": data["n_stacks"]}
        return data

    @model_validator(mode="before")
    @classmethod
    def _frames_of_movies(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("n_movies") is not None:
            movie = data.get("movie")
            frames = movie.get("n_frames") if isinstance(movie, dict) else getattr(movie, "n_frames", None)
            if not isinstance(frames, int) or isinstance(frames, bool):
                raise ValueError("n_movies needs a movie section with n_frames")
            if "n_images" in data and data["n_images"] != data["n_movies"] * frames:
                raise ValueError(f"n_images ({data['n_images']}) must be n_movies x movie.n_frames; give one of them")
            data = {**data, "n_images": data["n_movies"] * frames}
        return data

    @model_validator(mode="after")
    def _whole_movies(self) -> "Dataset":
        if self.movie is not None and self.n_images % self.frames_per_movie:
            raise ValueError(f"n_images ({self.n_images}) must be a whole number of movies of "
                             f"{self.frames_per_movie} frames (or give n_movies)")
        if self.n_movies is None and self.movie is not None:
            object.__setattr__(self, "n_movies", self.n_images // self.frames_per_movie)
        if self.n_stacks is None and self.stack is not None:
            object.__setattr__(self, "n_stacks", self.n_images)
        return self


class FactoryConfig(StrictModel):
    """A validated datasets file: what ``load_config`` and ``parse_config`` return.

    Attributes
    ----------
    seed : int
        The file's seed, 0 <= seed < 2**63; every image's random stream derives from it
        and the dataset's name.
    datasets : dict of str to Dataset
        Each dataset by name, the file's defaults merged in, in the file's order.
    source : str
        Where it was read from (the path; ``"<config>"`` by default for ``parse_config``),
        named by every error; not part of the hash.
    """

    seed: Annotated[int, Field(ge=0, lt=2**63)]
    datasets: dict[str, Dataset]
    source: str = ""

    def hash(self) -> str:
        """Hash (16 hex digits) of the seed and every dataset, ``source`` left out."""
        return config_hash(self.model_dump(mode="json", exclude={"source"}))

    def select(self, names: list[str] | None) -> list[Dataset]:
        """The datasets called ``names``, in that order; every one when ``names`` is empty or None.

        Raises
        ------
        ConfigError
            A name that is not a dataset of this config (``--only``).
        """
        if not names:
            return list(self.datasets.values())
        unknown = [n for n in names if n not in self.datasets]
        if unknown:
            raise ConfigError(
                f"{self.source or 'config'}: --only {', '.join(unknown)}: no such dataset "
                f"(have: {', '.join(self.datasets)})"
            )
        return [self.datasets[n] for n in names]


def dataset_hash(seed: int, ds: Dataset) -> str:
    """Hash of everything that determines a dataset's arrays.

    The compression codec changes the file, not the arrays, so it is left out: stores
    built before it was a setting keep their hash, and shards compressed differently
    still hold the same dataset.  The trajectory step enters resolved ("auto" and the
    step it stands for give the same arrays, so the same hash), and not at all when it
    is "dwell" (every store built before it was a setting) or nothing is stored.

    Parameters
    ----------
    seed : int
        The config's seed.
    ds : Dataset
        The dataset.

    Returns
    -------
    str
        16 hex digits (``config_hash`` of the seed and the dataset's settings).
    """
    d = ds.model_dump(mode="json", exclude={"output": {"compression", "trajectory_step"}})
    for key in ("movie", "n_movies", "stack", "n_stacks"):  # absent from stores built before them
        if d.get(key) is None:
            d.pop(key, None)
    if ds.output.trajectories and ds.trajectory_resolution != "dwell":
        d["output"]["trajectory_step"] = ds.trajectory_resolution
    return config_hash({"seed": seed, "dataset": d})


def config_hash(obj: Any) -> str:
    """First 16 hex digits of the SHA-256 of ``obj`` as canonical JSON (sorted keys)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# --- loading ------------------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
# What _NAME accepts, in words (a name is also a store's file name: no '.', '..' or '/').
NAME_RULE = ("a dataset name starts with a letter or digit, followed by letters, digits, '_', '-' or '.' "
             "(it names the store's file)")


def _merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            new_tag = infer_tag(value).get("type")
            old_tag = infer_tag(old).get("type")
            if "type" not in value and old_tag == "log_uniform" and set(value) <= {"low", "high"}:
                new_tag = old_tag  # bounds alone keep the variant they override (uniform has them too)
            if new_tag is None or new_tag == old_tag:
                out[key] = _merge(old, value)
                continue
        # Another variant (`type:`) replaces the whole section rather than mixing two.
        out[key] = copy.deepcopy(value)
    return out


def _has_path(tree: Any, loc: tuple) -> bool:
    for part in loc:
        if isinstance(tree, dict) and part in tree:
            tree = tree[part]
        else:
            return False
    return True


def _format_error(source: str, prefix: str, err: dict) -> str:
    loc = [str(p) for p in _strip_tags(tuple(err["loc"])) if not str(p).startswith("function-")]
    # Discriminated unions add the variant tag to the path ("...diffusion_um2_s.fixed.value").
    path = ".".join([prefix] + loc) if prefix else ".".join(loc)
    msg = err["msg"]
    if err["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{source}: {path}: {msg}"


def parse_config(raw: Any, source: str = "<config>") -> FactoryConfig:
    """Validate a parsed datasets document (``factory.parse_config``).

    Each dataset's settings are merged key by key into ``defaults`` (a section given
    another variant with ``type:`` replaces the default's whole section), then validated.

    Parameters
    ----------
    raw : Any
        The document as YAML reads it: a mapping with keys ``seed``, ``datasets`` and
        optionally ``defaults``.
    source : str
        What errors name as the file.

    Returns
    -------
    FactoryConfig
        The validated config, ``source`` recorded.

    Raises
    ------
    ConfigError
        The first problem, in one line naming ``source`` and the field's path (under
        ``datasets.<name>`` where the dataset wrote the value, else ``defaults``).

    Examples
    --------
    >>> cfg = parse_config({"seed": 1, "datasets": {"val": {"n_images": 8}}})
    >>> cfg.datasets["val"].image.pixel_size_um
    0.07
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping with keys seed, defaults, datasets")
    unknown = sorted(set(raw) - {"seed", "defaults", "datasets"})
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]}: unknown key (allowed: seed, defaults, datasets)")
    if "seed" not in raw:
        raise ConfigError(f"{source}: seed: missing (an integer; every image's random stream derives from it)")
    if "datasets" not in raw or not isinstance(raw["datasets"], dict) or not raw["datasets"]:
        raise ConfigError(f"{source}: datasets: must be a non-empty mapping of name -> settings")
    defaults = raw.get("defaults") or {}
    if not isinstance(defaults, dict):
        raise ConfigError(f"{source}: defaults: must be a mapping")
    try:
        DatasetSpec.model_validate(defaults)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, "defaults", exc.errors()[0])) from None

    datasets: dict[str, Dataset] = {}
    for name, override in raw["datasets"].items():
        if not isinstance(name, str):
            raise ConfigError(f"{source}: datasets: {name!r}: a dataset name is text; YAML read this one as "
                              f"{type(name).__name__} (quote it: '{name}')")
        if not _NAME.fullmatch(name):
            raise ConfigError(f"{source}: datasets: {name!r}: {NAME_RULE}")
        if override is None:
            override = {}
        if not isinstance(override, dict):
            raise ConfigError(f"{source}: datasets.{name}: must be a mapping (at least n_images)")
        if "name" in override:
            raise ConfigError(f"{source}: datasets.{name}.name: unknown key (the mapping key is the name)")
        merged = _merge(defaults, override)
        merged["name"] = name
        try:
            datasets[name] = Dataset.model_validate(merged)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = tuple(err["loc"])
            in_override = _has_path(override, _strip_tags(loc)[:2]) or not _has_path(
                defaults, _strip_tags(loc)[:2]
            )
            prefix = f"datasets.{name}" if in_override else "defaults"
            raise ConfigError(_format_error(source, prefix, err)) from None
    try:
        return FactoryConfig(seed=raw["seed"], datasets=datasets, source=source)
    except ValidationError as exc:
        raise ConfigError(_format_error(source, "", exc.errors()[0])) from None


_TAGS = {"fixed", "uniform", "log_uniform", "normal", "poisson", "pmt"}


def _strip_tags(loc: tuple) -> tuple:
    return tuple(p for p in loc if p not in _TAGS)


def load_config(path: str | Path) -> FactoryConfig:
    """Read and validate a datasets YAML file (``factory.load_config``).

    Parameters
    ----------
    path : str or Path
        The YAML file (keys ``seed``, ``defaults``, ``datasets``; see the module).

    Returns
    -------
    FactoryConfig
        The validated config; its ``source`` is ``path``.

    Raises
    ------
    ConfigError
        A missing or unreadable file, invalid YAML, a key written twice, or an invalid
        setting, in one line naming the file and the field.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise ConfigError(f"{source}: no such file")
    if path.is_dir():
        raise ConfigError(f"{source}: is a directory, expected a YAML file")
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{source}: not a text file (YAML is UTF-8 text)") from None
    return parse_config(parse_yaml(text, source), source)


def parse_yaml(text: str, source: str) -> Any:
    """The YAML document of ``text`` (plain data only: safe loading).

    It refuses what the YAML reader would silently drop: a key written twice in one
    mapping (the last would win).

    Parameters
    ----------
    text : str
        The YAML text.
    source : str
        What errors name as the file.

    Returns
    -------
    Any
        The document (None when empty).

    Raises
    ------
    ConfigError
        Invalid YAML or a duplicate key, naming ``source``, the field and the line.
    """
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _refuse_duplicate_keys(loader, node, (), source, set())
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{source}: invalid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def _refuse_duplicate_keys(loader: yaml.SafeLoader, node: yaml.Node, path: tuple, source: str, seen: set) -> None:
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        # Keys compared as the mapping will hold them (1, 1.0 and true are one key).
        lines: dict[Any, tuple[str, list[int]]] = {}
        for key, _value in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                k = loader.construct_object(key)
                lines.setdefault(k, (key.value, []))[1].append(key.start_mark.line + 1)
        for name, at in lines.values():
            if len(at) > 1:
                where = ".".join(map(str, (*path, name)))
                if len(set(at)) == 1:
                    numbers = f"{len(at)} times on line {at[0]}"
                else:
                    numbers = "lines " + ", ".join(map(str, at[:-1])) + f" and {at[-1]}"
                raise ConfigError(f"{source}: {where}: duplicate key ({numbers}); YAML would keep only "
                                  "the last one silently, so write it once")
        for key, value in node.value:
            _refuse_duplicate_keys(loader, value, (*path, key.value if isinstance(key, yaml.ScalarNode) else "?"),
                                   source, seen)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _refuse_duplicate_keys(loader, item, (*path, i), source, seen)


def config_from_json(text: str) -> FactoryConfig:
    """Rebuild a config stored in a store's attributes.

    A store written before ``output.trajectory_step`` existed holds every dwell, so a
    stored config without the field reads as "dwell" (not the "auto" default).
    """
    data = json.loads(text)
    for ds in (data.get("datasets") or {}).values():
        if isinstance(ds, dict) and isinstance(ds.get("output"), dict):
            ds["output"].setdefault("trajectory_step", "dwell")
    return FactoryConfig.model_validate(data)


# --- reference ----------------------------------------------------------------------------


def schema_text() -> str:
    """The reference of every config field, as `factory schema` prints it (``factory.schema_text``).

    Returns
    -------
    str
        The top-level keys and the rule for dataset names, a blank line, then one line
        per size field of a dataset (``n_images``, ``n_movies``, ``n_stacks``) and one
        per field of its sections: path, type, default (the seed paper's values) and
        limits, the unit in the field's name.  No final newline.

    Examples
    --------
    >>> from factory import schema_text
    >>> schema_text().splitlines()[0].startswith("Top level: seed")
    True
    """
    from .inspect_store import schema_lines, size_lines  # it reads the models of this module

    header = ("Top level: seed (int), defaults (the fields below), datasets (name -> "
              "its size, n_images, n_movies or n_stacks, plus any field below to override).\n"
              f"{NAME_RULE[0].upper()}{NAME_RULE[1:]}.\n")
    return "\n".join([header, *size_lines(), *schema_lines()])
