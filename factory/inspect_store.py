"""Human-readable summaries of stores and of the config schema."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import numpy as np
from pydantic import BaseModel

from .config import DatasetSpec
from .stores import Store

_SAMPLE = 4096  # images read for photon statistics


def summarize(path: Path) -> dict:
    """Shapes, generation parameters and photon statistics of one store (``factory.summarize``).

    What ``factory inspect`` prints (``format_summary``).  The photon statistics are of
    the first 4096 images (stacks: stacks), the particle count of every image.

    Parameters
    ----------
    path : Path
        A finished store (``.h5`` or ``.zarr``).

    Returns
    -------
    dict
        JSON-ready: ``path``, ``format``, ``n_images`` (store rows), ``arrays`` (name ->
        shape, dtype, chunks; None for a virtual array), ``seed``, ``package_version``,
        ``dataset_hash``, ``compression``, ``parameters`` (image size in px, pixel size
        um, dwell us, line retrace ms, scan direction, PSF sigmas um, N_bkg, detector, D
        um^2/s and N_qd laws, and the movie, stack and blinking sections), ``stats``
        (``mean_count``, ``std_count``, ``max_count`` and ``mean_peak_count`` in photon
        counts or ADU, ``particles_per_image``, ``diffusion_um2_s_range``; movies add
        ``particles_in_view_per_frame`` and ``frame_period_ms``, stacks ``planes``,
        ``plane_period_ms`` and ``particles_in_view_per_stack``, blinking
        ``mean_on_fraction``, a stored expectation ``mean_expected`` and
        ``mean_peak_expected``); movies add ``n_movies``, stacks ``n_stacks``.

    Raises
    ------
    StoreError
        A missing, unreadable or incomplete store.
    """
    with Store(path) as st:
        n = len(st)
        m = min(n, _SAMPLE)
        images = st.read("images", 0, m).astype(np.float64)
        n_particles = st.read("n_particles")
        diffusion = st.read("diffusion", 0, m)
        ds = st.dataset
        out = {
            "path": str(path),
            "format": st.format,
            "n_images": n,
            # A virtual (finalized sharded) HDF5 array has no chunks of its own.
            "arrays": {name: {"shape": list(st[name].shape), "dtype": str(st[name].dtype),
                              "chunks": list(st[name].chunks) if st[name].chunks else None}
                       for name in st.names},
            "seed": st.config["seed"],
            "package_version": st.attrs.get("package_version"),
            "dataset_hash": st.attrs.get("dataset_hash"),
            "compression": st.attrs.get("compression", "blosc-lz4"),
            "parameters": {
                "image_px": [ds.image.height_px, ds.image.width_px],
                "pixel_size_um": ds.image.pixel_size_um,
                "dwell_us": ds.scan.dwell_us,
                "line_retrace_ms": ds.scan.line_retrace_ms,
                "direction": ds.scan.direction,
                "sigma_xy_um": ds.psf.sigma_xy_um,
                "sigma_z_um": ds.psf.sigma_z_um,
                "n_bkg": ds.background.n_bkg,
                "detector": ds.detector.type,
                "diffusion_um2_s": ds.particles.diffusion_um2_s.model_dump(),
                "n_qd": ds.particles.n_qd.model_dump(),
                "movie": ds.movie.model_dump() if ds.movie else None,
                **({"stack": ds.stack.model_dump()} if ds.stack is not None else {}),
                **({"blinking": ds.particles.blinking.model_dump()} if ds.particles.blinking else {}),
            },
            "stats": {
                "sampled_images": m,
                "mean_count": float(images.mean()),
                "std_count": float(images.std()),
                "max_count": float(images.max()),
                "mean_peak_count": float(images.reshape(m, -1).max(1).mean()),
                "particles_per_image": float(n_particles.mean()),
                "diffusion_um2_s_range": [float(np.nanmin(diffusion)), float(np.nanmax(diffusion))]
                if np.isfinite(diffusion).any() else None,
            },
        }
        if ds.movie is not None and "in_view" in st:
            out["n_movies"] = n // ds.movie.n_frames
            out["stats"]["particles_in_view_per_frame"] = float(st.read("in_view", 0, m).sum(1).mean())
            fs = st.read("frame_start_s", 0, min(n, 2))
            out["stats"]["frame_period_ms"] = float(1000 * (fs[1] - fs[0])) if len(fs) > 1 else None
        if ds.stack is not None and "plane_start_s" in st:
            out["n_stacks"] = n
            starts = st.read("plane_start_s", 0, 1)[0]
            out["stats"]["planes"] = len(starts)
            out["stats"]["plane_period_ms"] = float(1000 * (starts[1] - starts[0])) if len(starts) > 1 else None
            out["stats"]["particles_in_view_per_stack"] = float(st.read("in_view", 0, m).sum(1).mean())
        if "on_fraction" in st:
            on = st.read("on_fraction", 0, m)
            out["stats"]["mean_on_fraction"] = float(np.nanmean(on)) if np.isfinite(on).any() else None
        if "expected" in st:
            expected = st.read("expected", 0, m).astype(np.float64)
            out["stats"]["mean_expected"] = float(expected.mean())
            out["stats"]["mean_peak_expected"] = float(expected.reshape(m, -1).max(1).mean())
        return out


def format_summary(s: dict, brief: bool = False) -> str:
    """A ``summarize`` result as text: a block of lines, or one line with ``brief``."""
    st = s["stats"]
    if brief:
        d = st["diffusion_um2_s_range"]
        drange = f"D {d[0]:.2f}-{d[1]:.2f} um^2/s" if d else "no particles"
        h, w = s["parameters"]["image_px"]
        movies = f" ({s['n_movies']} movies)" if s.get("n_movies") else ""
        if s.get("n_stacks"):
            return (f"{Path(s['path']).name}: {s['n_stacks']} stacks of {st['planes']} planes {h}x{w}, {drange}, "
                    f"mean count {st['mean_count']:.2f}, mean peak {st['mean_peak_count']:.1f}, "
                    f"{st['particles_per_image']:.2f} particles/stack")
        return (f"{Path(s['path']).name}: {s['n_images']} images{movies} {h}x{w}, {drange}, "
                f"mean count {st['mean_count']:.2f}, mean peak {st['mean_peak_count']:.1f}, "
                f"{st['particles_per_image']:.2f} particles/image")
    lines = [f"{s['path']} ({s['format']} {s['compression']}, {s['n_images']} images, seed {s['seed']}, "
             f"package {s['package_version']}, hash {s['dataset_hash']})", "  arrays:"]
    for name, a in s["arrays"].items():
        layout = f"chunks {tuple(a['chunks'])}" if a["chunks"] else "virtual (rows in the shard files)"
        lines.append(f"    {name:<13} {str(tuple(a['shape'])):<22} {a['dtype']:<8} {layout}")
    lines.append("  parameters:")
    for key, value in s["parameters"].items():
        lines.append(f"    {key:<17} {json.dumps(value)}")
    lines.append(f"  photon statistics (first {st['sampled_images']} images):")
    for key, value in st.items():
        if key != "sampled_images":
            lines.append(f"    {key:<22} {json.dumps(value if not isinstance(value, float) else round(value, 4))}")
    return "\n".join(lines)


# --- schema --------------------------------------------------------------------------


def _metadata(field) -> list:
    """A field's constraints, also those of an optional one (``Optional[Annotated[...]]``)."""
    meta = list(field.metadata)
    for arg in typing.get_args(field.annotation):
        if typing.get_origin(arg) is typing.Annotated:
            for m in typing.get_args(arg)[1:]:
                meta += list(getattr(m, "metadata", [m]))
    return meta


def _limits(field) -> list[str]:
    parts = []
    for m in _metadata(field):
        for attr, sym in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<=")):
            v = getattr(m, attr, None)
            if v is not None:
                parts.append(f"{sym} {v:g}" if isinstance(v, float) else f"{sym} {v}")
    return parts


def _constraints(field) -> str:
    return ", ".join(_limits(field))


def config_field(path: str, model: type[BaseModel] = DatasetSpec):
    """The pydantic field at a dotted path of the dataset schema (``image.pixel_size_um``)."""
    *sections, name = path.split(".")
    for part in sections:
        model = _variants(model.model_fields[part].annotation)[0]
    return model.model_fields[name]


def check_against_field(label: str, value: float, path: str, noun: str, unit: str) -> str | None:
    """Why ``value`` is outside the limits of the config field at ``path``; None when inside.

    ``label`` names where the value was given (e.g. a command-line flag), ``noun`` and
    ``unit`` how the line names the quantity; the reason is one line.
    """
    from pydantic import TypeAdapter, ValidationError

    field = config_field(path)
    tp = typing.Annotated[(field.annotation, *field.metadata)] if field.metadata else field.annotation
    try:
        TypeAdapter(tp).validate_python(value)
        return None
    except ValidationError:
        limits = _limits(field)
        rule = " and ".join([", ".join(limits[:-1]), limits[-1]] if len(limits) > 1 else limits)
        return (f"{label} {value}: {noun} must be {rule} {unit} (a finite number; the limits of {path} "
                "in `factory schema`)")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is typing.Union:
        return " | ".join("None" if a is type(None) else _type_name(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _variants(tp) -> list[type[BaseModel]]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Annotated:
        return _variants(args[0])
    args = tuple(a for a in args if a is not type(None))  # Optional sections
    if args and all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
        return list(args)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    return []


def schema_lines(model: type[BaseModel] = DatasetSpec, prefix: str = "") -> list[str]:
    """One line per config field: path, type, default, limits and description."""
    lines = []
    for name, field in model.model_fields.items():
        path = f"{prefix}{name}"
        variants = _variants(field.annotation)
        if variants:
            default = field.default
            dflt = ""
            if isinstance(default, BaseModel):
                dflt = "  default: " + json.dumps(default.model_dump(mode="json"))
            if len(variants) == 1:
                if default is None:  # an optional section (movies, stacks)
                    doc = (variants[0].__doc__ or "").strip().splitlines()
                    dflt = "  optional (default: none)" + (f"  # {doc[0]}" if doc else "")
                lines.append(f"{path}:{dflt}")
                lines += schema_lines(variants[0], path + ".")
            else:
                lines.append(f"{path}: one of the variants below (pick with `type:`){dflt}")
                for v in variants:
                    doc = (v.__doc__ or "").strip().splitlines()
                    lines.append(f"  {path} (type: {v.model_fields['type'].default})"
                                 + (f"  # {doc[0]}" if doc else ""))
                    lines += ["  " + ln for ln in schema_lines(v, path + ".") if not ln.startswith(f"{path}.type ")]
            continue
        limits = _constraints(field)
        default = "required" if field.is_required() else f"default {field.default!r}"
        lines.append(f"{path:<44} {_type_name(field.annotation):<34} {default}"
                     + (f"  ({limits})" if limits else ""))
    return lines


_SIZE_NOTES = {
    "n_images": "images (movies: frames; stacks: stacks); required unless n_movies or n_stacks is given",
    "n_movies": "with a movie section: movies of movie.n_frames frames (n_images = n_movies x n_frames)",
    "n_stacks": "with a stack section: z-stacks, one store row each (n_images = n_stacks)",
}


def size_lines() -> list[str]:
    """One line per size field of a dataset (``n_images``, ``n_movies``, ``n_stacks``).

    These are the fields a dataset has beyond the shared sections, its name aside.
    """
    from .config import Dataset

    lines = []
    for name, field in Dataset.model_fields.items():
        if name in DatasetSpec.model_fields or name == "name":
            continue
        limits = _constraints(field)
        note = _SIZE_NOTES.get(name, "")
        lines.append(f"{name:<44} {'int':<34} per dataset" + (f"  ({limits})" if limits else "")
                     + (f"  # {note}" if note else ""))
    return lines
