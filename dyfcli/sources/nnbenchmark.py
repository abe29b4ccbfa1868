"""nn-benchmark's physical systems: read the original split directories, and write trajectories as a store.

The nn-benchmark archive (Otness et al.; docs/paper-notes.md §9.2) holds one directory per split with
`trajectories.npz` (keys `traj_{i:05d}_{field}` plus shared arrays) and `system_meta.json`, whose
per-trajectory `field_keys` map generic names (p, q, t, extra_fixed_mask, vertices, …) to npz keys. We read
through `field_keys` only. Nodes are flattened with y fastest: Navier–Stokes 9282 = 221 (x) × 42 (y),
spring mesh 100 = 10 (x) × 10 (y). Our stores use dims (y, x), the transpose of DYffusion's (x, y) grids.

Both the reader and the built-in simulators produce a `Trajectories` value; `write_trajectories` adds the
training-split statistics and writes the data store (docs/design.md §3) atomically.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dyfcli.errors import DataError, UsageError

log = logging.getLogger("dyf.nnbenchmark")

SPLITS = ("train", "val", "test")
OOD_SPLIT = "test_ood"


@dataclass(frozen=True)
class System:
    """What the reader and the store writer need to know about one nn-benchmark system."""

    name: str                      # system name in system_meta.json
    archive_dir: str               # folder name in the archive: <root>/<archive_dir>/run/data_gen/<split>
    fields: tuple[str, ...]
    units: dict[str, str]
    long_names: dict[str, str]
    nodes: tuple[int, int]         # (X, Y) of the flattened node order, y fastest
    split_dirs: dict[str, str]     # the exact directory names DYffusion used
    time_chunk: int                # store chunk length in time


NAVIER_STOKES = System(
    name="navier-stokes",
    archive_dir="navier-stokes-multi",
    fields=("u", "v", "p"),
    units={"u": "m s-1", "v": "m s-1", "p": "Pa"},
    long_names={"u": "streamwise velocity", "v": "cross-stream velocity",
                "p": "pressure (density 1, p = 0 at the outlet)"},
    nodes=(221, 42),
    split_dirs={"train": "ns-runs_train-navier-stokes-n100-t65-n0_00001",
                "val": "ns-runs_val-navier-stokes-n2-t65-n0_00001",
                "test": "ns-runs_eval-cors1-navier-stokes-n5-t65-n0_tagcors1_00001"},
    time_chunk=5,
)

SPRING_MESH = System(
    name="spring-mesh",
    archive_dir="spring-mesh",
    fields=("px", "py", "qx", "qy"),
    units={"px": "kg m s-1", "py": "kg m s-1", "qx": "m", "qy": "m"},
    long_names={"px": "particle momentum, x", "py": "particle momentum, y",
                "qx": "particle position, x", "qy": "particle position, y"},
    nodes=(10, 10),
    split_dirs={"train": "springmesh-10-perturball-runs_train-spring-mesh-n100-t805-n0_00001",
                "val": "springmesh-10-perturball-runs_val-spring-mesh-n3-t805-n0_00001",
                "test": "springmesh-10-perturball-runs_eval-spring-mesh-n15-t805-n0_tagcors1_00001",
                OOD_SPLIT: "springmesh-10-perturball-runs_eval-outdist-spring-mesh-n15-t805-n0_tagcors1_00001"},
    time_chunk=805,
)


@dataclass
class Trajectories:
    """Trajectories of one system, ordered by split, ready to be written as a data store.

    load(series) -> float32 `(T, C, Y, X)` in physical units, NaN where `mask` is False.
    mask: bool `(S, Y, X)`; cond: name -> float32 `(S, Y, X)` 0/1 fields (stored as `cond_<name>`);
    splits: split name -> number of series (consecutive, in this order); boundary: the `dyf_boundary` attribute.
    """

    system: System
    times: np.ndarray
    time_step: float
    y: np.ndarray
    x: np.ndarray
    splits: dict[str, int]
    load: Callable[[int], np.ndarray]
    mask: np.ndarray
    cond: dict[str, np.ndarray]
    boundary: dict
    source: str
    recipe: dict
    series_names: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        return sum(self.splits.values())

    def split_series(self) -> dict[str, list[int]]:
        """Series indices of each split."""
        out, start = {}, 0
        for name, count in self.splits.items():
            out[name] = list(range(start, start + count))
            start += count
        return out


def nodes_to_grid(values: np.ndarray, nodes: tuple[int, int]) -> np.ndarray:
    """Flattened nodes (y fastest) `(..., N)` -> `(..., Y, X)`."""
    nx, ny = nodes
    values = np.asarray(values)
    return values.reshape(*values.shape[:-1], nx, ny).swapaxes(-1, -2)


# ---------------------------------------------------------------------------------------- split folders

def find_split_dirs(root: Path, system: System, splits: tuple[str, ...] = SPLITS) -> dict[str, Path]:
    """The split directories under `root`: the archive root, `<system>/run/data_gen`, or a folder of splits.

    Exact DYffusion names win; otherwise one directory per split is matched by its nn-benchmark name
    (`_train-`, `_val-`, `_eval-` without `outdist` or a coarser `cors4`/`cors16` time step; `_eval-outdist-`
    for the out-of-distribution test set).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"--from {root} is not a folder; give the nn-benchmark data folder "
                        f"(containing {system.archive_dir}/run/data_gen/ or the split folders)")
    base = _data_gen_dir(root, system)
    candidates = sorted(p for p in base.iterdir() if (p / "system_meta.json").is_file())
    if not candidates:
        raise DataError(f"no nn-benchmark split folders (with system_meta.json) under {base}; "
                        f"give the folder containing {system.archive_dir}/run/data_gen/")
    return {split: _pick_split(split, candidates, system) for split in splits}


def _data_gen_dir(root: Path, system: System) -> Path:
    for base in (root / system.archive_dir / "run" / "data_gen", root / "run" / "data_gen"):
        if base.is_dir():
            return base
    return root


_COARSER = re.compile(r"cors(?!1(?!\d))\d+")


def _matches(split: str, name: str, system: System) -> bool:
    if _COARSER.search(name):
        return False
    if split == "train":
        return f"_train-{system.name}-" in name
    if split == "val":
        return f"_val-{system.name}-" in name
    if split == "test":
        return "_eval-" in name and "outdist" not in name and system.name in name
    if split == OOD_SPLIT:
        return "_eval-outdist-" in name and system.name in name
    raise ValueError(split)


def _pick_split(split: str, candidates: list[Path], system: System) -> Path:
    exact = [p for p in candidates if p.name == system.split_dirs.get(split)]
    if exact:
        return exact[0]
    matching = [p for p in candidates if _matches(split, p.name, system)]
    if not matching:
        raise DataError(f"no {split} split folder for {system.name} among {[p.name for p in candidates]}; "
                        f"expected e.g. {system.split_dirs.get(split, '…_eval-outdist-…')}")
    if len(matching) > 1:
        # e.g. the nested train sets n25 ⊂ n50 ⊂ n100: take the largest
        matching.sort(key=lambda p: _trajectory_count(p.name))
        log.info("several %s folders match; using %s", split, matching[-1].name)
    return matching[-1]


def _trajectory_count(name: str) -> int:
    found = re.search(r"-n(\d+)-t\d+", name)
    return int(found.group(1)) if found else 0


# -------------------------------------------------------------------------------------------- reading

@dataclass
class SplitFiles:
    """One split directory: its metadata, npz path and per-trajectory metadata."""

    directory: Path
    meta: dict
    trajectories: list[dict]

    @property
    def npz(self) -> Path:
        return self.directory / "trajectories.npz"


def open_split(directory: Path, system: System) -> SplitFiles:
    """Read `system_meta.json` and check that `trajectories.npz` is there."""
    meta_path = directory / "system_meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"{meta_path} is not readable JSON ({err}); re-download the nn-benchmark split") from None
    if meta.get("system") not in (None, system.name):
        raise DataError(f"{directory} holds system {meta.get('system')!r}, not {system.name!r}; "
                        f"use `dyf prepare {meta.get('system')}` or point --from at the {system.name} data")
    trajectories = meta.get("trajectories")
    if not isinstance(trajectories, list) or not trajectories or not all("field_keys" in t for t in trajectories):
        raise DataError(f"{meta_path} has no 'trajectories' list with 'field_keys'; "
                        "it is not an nn-benchmark system_meta.json")
    split = SplitFiles(directory, meta, trajectories)
    if not split.npz.is_file():
        raise DataError(f"{split.npz} is missing; re-download or re-extract the nn-benchmark split")
    return split


def _array(npz, keys: dict, name: str, where: Path, required: bool = True):
    key = keys.get(name)
    if key is None or key not in npz.files:
        if not required:
            return None
        raise DataError(f"{where}: trajectories.npz has no array for {name!r} (field_keys gives {key!r}); "
                        "re-download the nn-benchmark split")
    return npz[key]


def _check_nodes(array: np.ndarray, system: System, name: str, where: Path, axis: int) -> None:
    expected = system.nodes[0] * system.nodes[1]
    if array.ndim <= axis or array.shape[axis] != expected:
        raise DataError(f"{where}: {name} has shape {array.shape}, expected {expected} nodes "
                        f"({system.nodes[0]} × {system.nodes[1]}) for {system.name}")


def read_navier_stokes(split: SplitFiles, index: int, frames: bool = True) -> dict:
    """One trajectory: "frames" `(T, 3, 42, 221)` float32 (NaN in obstacles; only when `frames`), "times",
    "fixed" and "obstacle" bool `(42, 221)`, "in_velocity", "vertices" (or None)."""
    system = NAVIER_STOKES
    keys = split.trajectories[index]["field_keys"]
    with np.load(split.npz) as npz:
        masks = np.asarray(_array(npz, keys, "extra_fixed_mask", split.directory))
        _check_nodes(masks, system, "extra_fixed_mask", split.directory, 0)
        if masks.ndim != 2 or masks.shape[1] != 2:
            raise DataError(f"{split.directory}: extra_fixed_mask has shape {masks.shape}, expected (9282, 2)")
        obstacle = nodes_to_grid(masks[:, 1] != 0, system.nodes)
        record = {"fixed": nodes_to_grid(masks[:, 0] != 0, system.nodes), "obstacle": obstacle,
                  "in_velocity": float(split.trajectories[index].get("in_velocity", 1.0)),
                  "vertices": _array(npz, keys, "vertices", split.directory, required=False),
                  "times": _times(split, index, _array(npz, keys, "t", split.directory, required=False))}
        if frames:
            velocity = np.asarray(_array(npz, keys, "p", split.directory), dtype=np.float32)
            pressure = np.asarray(_array(npz, keys, "q", split.directory), dtype=np.float32)
            _check_nodes(velocity, system, "p (velocity)", split.directory, 1)
            _check_nodes(pressure, system, "q (pressure)", split.directory, 1)
            if velocity.ndim != 3 or velocity.shape[-1] != 2 or pressure.shape[:2] != velocity.shape[:2]:
                raise DataError(f"{split.directory}: velocity {velocity.shape} and pressure {pressure.shape} "
                                "do not match (T, 9282, 2) and (T, 9282)")
            stacked = np.stack([velocity[..., 0], velocity[..., 1], pressure], axis=1)   # (T, 3, 9282)
            record["frames"] = nodes_to_grid(stacked, system.nodes).copy()
            record["frames"][:, :, obstacle] = np.nan
    return record


def read_spring_mesh(split: SplitFiles, index: int, frames: bool = True) -> dict:
    """One trajectory: "frames" `(T, 4, 10, 10)` float32 = (px, py, qx, qy) (only when `frames`), "times",
    "fixed" bool `(10, 10)` (the pinned particles)."""
    system = SPRING_MESH
    keys = split.trajectories[index]["field_keys"]
    with np.load(split.npz) as npz:
        pinned = None
        for name in ("extra_fixed_mask", "fixed_mask", "fixed_mask_q", "fixed_mask_p"):
            pinned = _array(npz, keys, name, split.directory, required=False)
            if pinned is not None:
                break
        if pinned is None:
            raise DataError(f"{split.directory}: no fixed-particle mask (extra_fixed_mask or fixed_mask) in "
                            "field_keys; re-download the nn-benchmark split")
        pinned = np.asarray(pinned) != 0
        pinned = pinned.reshape(pinned.shape[0], -1).any(axis=-1)
        _check_nodes(pinned, system, "fixed mask", split.directory, 0)
        record = {"fixed": nodes_to_grid(pinned, system.nodes),
                  "times": _times(split, index, _array(npz, keys, "t", split.directory, required=False))}
        if frames:
            momentum = np.asarray(_array(npz, keys, "p", split.directory), dtype=np.float32)
            position = np.asarray(_array(npz, keys, "q", split.directory), dtype=np.float32)
            for name, array in (("p", momentum), ("q", position)):
                _check_nodes(array, system, name, split.directory, 1)
                if array.ndim != 3 or array.shape[-1] != 2:
                    raise DataError(f"{split.directory}: {name} has shape {array.shape}, expected (T, 100, 2)")
            state = np.concatenate([momentum, position], axis=-1)                  # (T, 100, 4)
            record["frames"] = nodes_to_grid(np.moveaxis(state, -1, 1), system.nodes).copy()
    return record


def _times(split: SplitFiles, index: int, times) -> np.ndarray:
    if times is not None:
        return np.asarray(times, dtype=np.float64).reshape(-1)
    meta = split.trajectories[index]
    if "num_time_steps" not in meta:
        raise DataError(f"{split.directory}: trajectory {index} has neither a 't' array nor num_time_steps")
    return np.arange(int(meta["num_time_steps"])) * float(meta.get("time_step_size", 1.0))


READERS = {"navier-stokes": read_navier_stokes, "spring-mesh": read_spring_mesh}


def read_archive(root: Path, system: System, *, counts: dict[str, int] | None = None,
                 ood: bool = False) -> Trajectories:
    """Trajectories from the original nn-benchmark files under `root`.

    counts: optional split -> number of trajectories to keep (the first ones); all of them by default.
    """
    wanted = SPLITS + ((OOD_SPLIT,) if ood else ())
    dirs = find_split_dirs(root, system, wanted)
    splits = {name: open_split(path, system) for name, path in dirs.items()}
    sizes = {}
    for name, split in splits.items():
        available = len(split.trajectories)
        wanted_count = available if counts is None or name not in counts else counts[name]
        if wanted_count > available:
            raise UsageError(f"--trajectories asks for {wanted_count} {name} trajectories but "
                             f"{split.directory.name} has {available}; ask for at most {available}")
        sizes[name] = wanted_count
    order = [(name, i) for name in splits for i in range(sizes[name])]
    reader = READERS[system.name]
    statics = [reader(splits[name], i, frames=False) for name, i in order]
    times = statics[0]["times"]
    for (name, i), static in zip(order, statics):
        if len(static["times"]) != len(times) or not np.allclose(static["times"], times, atol=1e-6):
            raise DataError(f"trajectory {i} of {splits[name].directory.name} has different time steps "
                            f"({len(static['times'])}) from the first; all splits must share one time axis")

    def load(series: int) -> np.ndarray:
        name, i = order[series]
        frames = reader(splits[name], i)["frames"]
        if len(frames) != len(times):
            raise DataError(f"trajectory {i} of {splits[name].directory.name} has {len(frames)} frames but "
                            f"{len(times)} times; re-download the nn-benchmark split")
        obstacle = statics[series].get("obstacle")
        check_finite(frames, True if obstacle is None else ~obstacle, system.fields,
                     f"trajectory {i} of {splits[name].directory}")
        return frames

    return _archive_trajectories(system, root, splits, sizes, order, statics, times, load)


def check_finite(frames: np.ndarray, valid: np.ndarray | bool, fields: tuple[str, ...], where: str) -> None:
    """DataError when `frames` `(T, C, Y, X)` hold NaN or ±inf at a valid node (`valid` `(Y, X)`).

    The statistics are one global mean and std per field: a single inf or NaN there would make them
    non-finite for every node of every trajectory. Obstacle nodes hold NaN on purpose and are skipped."""
    bad = ~np.isfinite(frames) & valid
    if not bad.any():
        return
    step, channel, y, x = (int(i) for i in np.argwhere(bad)[0])
    count = int(bad.sum())
    raise DataError(f"{where}: {count} non-finite value{'s' if count > 1 else ''} (NaN or ±inf) at valid nodes, "
                    f"the first in {fields[channel]!r} at frame {step}, node y {y}, x {x}; the file is damaged "
                    "or its simulation diverged: re-download or re-extract the nn-benchmark split")


def _archive_trajectories(system, root, splits, sizes, order, statics, times, load) -> Trajectories:
    fixed = np.stack([s["fixed"] for s in statics])
    ny, nx = fixed.shape[1:]
    y, x = np.arange(ny, dtype=np.float64), np.arange(nx, dtype=np.float64)
    cond = {"fixed": fixed.astype(np.float32)}
    if system is NAVIER_STOKES:
        obstacle = np.stack([s["obstacle"] for s in statics])
        cond["obstacle"] = obstacle.astype(np.float32)
        mask = ~obstacle
        vertices = statics[0].get("vertices")
        if vertices is not None and np.shape(vertices) == (nx * ny, 2):
            grid = np.asarray(vertices, dtype=np.float64).reshape(nx, ny, 2)
            x, y = grid[:, 0, 0], grid[0, :, 1]
        else:
            x, y = x * 0.01, y * 0.01
        boundary = navier_stokes_boundary([s["in_velocity"] for s in statics])
    else:
        mask = np.ones_like(fixed, dtype=bool)
        boundary = spring_mesh_boundary()
    first = splits["train"].trajectories[0]
    step = float(times[1] - times[0]) if len(times) > 1 else float(first.get("time_step_size", 1.0))
    return Trajectories(
        system=system, times=np.asarray(times, dtype=np.float64), time_step=step, y=y, x=x, splits=sizes,
        load=load, mask=mask, cond=cond, boundary=boundary,
        source=f"nn-benchmark {system.archive_dir} files under {Path(root).resolve()}",
        recipe={"from": str(Path(root).resolve()), "splits": {n: s.directory.name for n, s in splits.items()},
                "trajectories": sizes},
        series_names=[f"{splits[name].directory.name}/{splits[name].trajectories[i].get('name', i)}"
                      for name, i in order],
    )


def navier_stokes_boundary(in_velocity: list[float]) -> dict:
    """The `dyf_boundary` attribute of a Navier–Stokes store (read by `dyfcli.boundary`)."""
    return {"kind": "navier-stokes", "in_velocity": [float(v) for v in in_velocity], "height": 0.41,
            "ramp_rate": 5.0, "u_field": "u", "v_field": "v", "p_field": "p",
            "fixed": "cond_fixed", "obstacle": "cond_obstacle", "inlet": "first x column"}


def spring_mesh_boundary() -> dict:
    """The `dyf_boundary` attribute of a spring-mesh store (pinned positions come from the first frame)."""
    return {"kind": "spring-mesh", "momentum_fields": ["px", "py"], "position_fields": ["qx", "qy"],
            "pinned": "cond_fixed", "initial_positions": "first frame of each series"}


# -------------------------------------------------------------------------------------------- writing

def training_statistics(trajectories: Trajectories) -> dict[str, tuple[float, float]]:
    """Global mean and std per field over the training series, valid points only, in float64."""
    fields = trajectories.system.fields
    count = np.zeros(len(fields))
    mean = np.zeros(len(fields))
    m2 = np.zeros(len(fields))
    for series in trajectories.split_series()["train"]:
        frames = trajectories.load(series).astype(np.float64)                    # (T, C, Y, X)
        values = frames[:, :, trajectories.mask[series]]                          # (T, C, N)
        values = np.moveaxis(values, 1, 0).reshape(len(fields), -1)
        n = values.shape[1]
        batch_mean = values.mean(axis=1)
        batch_m2 = ((values - batch_mean[:, None]) ** 2).sum(axis=1)
        delta = batch_mean - mean
        total = count + n
        mean = mean + delta * n / total
        m2 = m2 + batch_m2 + delta**2 * count * n / total
        count = total
    if not count.any():
        raise UsageError("the train split is empty; ask for at least one training trajectory")
    std = np.sqrt(m2 / count)
    return {name: (float(mean[c]), float(std[c])) for c, name in enumerate(fields)}


NORMALIZATIONS = ("global", "none")  # `dyf prepare navier-stokes|spring-mesh --normalization`


def to_dataset(trajectories: Trajectories, stats: dict[str, tuple[float, float]], normalization: str = "global"):
    """The data store as a lazy xarray Dataset (frames are loaded per series when written).

    `normalization`: `global` (z-scores per field with the training statistics) or `none` (raw units, as
    the official code trains these systems; the statistics are still stored for climatology and inspection).
    """
    import dask
    import dask.array as da
    import xarray as xr

    from dyfcli.store import provenance_attrs

    system = trajectories.system
    steps, channels = len(trajectories.times), len(system.fields)
    ny, nx = trajectories.mask.shape[1:]
    per_series = [da.from_delayed(dask.delayed(trajectories.load)(s), shape=(steps, channels, ny, nx),
                                  dtype=np.float32) for s in range(trajectories.count)]
    frames = da.stack(per_series)                                                  # (S, T, C, Y, X)
    ds = xr.Dataset(coords={
        "series": ("series", np.arange(trajectories.count), {"long_name": "trajectory id"}),
        "time": ("time", trajectories.times, {"long_name": "physical time", "units": "s"}),
        "y": ("y", np.asarray(trajectories.y), {"long_name": _axis_name(system, "y")}),
        "x": ("x", np.asarray(trajectories.x), {"long_name": _axis_name(system, "x")}),
    })
    chunk = min(system.time_chunk, steps)
    for c, name in enumerate(system.fields):
        ds[name] = (("series", "time", "y", "x"), frames[:, :, c].rechunk((1, chunk, ny, nx)),
                    {"units": system.units[name], "long_name": system.long_names[name]})
        ds[f"stats_mean_{name}"] = ((), np.float32(stats[name][0]), {"units": system.units[name]})
        ds[f"stats_std_{name}"] = ((), np.float32(stats[name][1]), {"units": system.units[name]})
    ds["mask"] = (("series", "y", "x"), trajectories.mask.astype(bool))
    for name, values in trajectories.cond.items():
        ds[f"cond_{name}"] = (("series", "y", "x"), values.astype(np.float32))
    series = trajectories.split_series()
    ds.attrs.update(provenance_attrs(trajectories.source, trajectories.recipe))
    ds.attrs.update({
        "dyf_fields": list(system.fields),
        "dyf_splits": {name: {"series": ids} for name, ids in series.items()},
        "dyf_normalization": normalization,
        "dyf_time_step": float(trajectories.time_step),
        "dyf_boundary": trajectories.boundary,
        "dyf_system": system.name,
        "dyf_series_names": trajectories.series_names,
    })
    return ds


def _axis_name(system: System, axis: str) -> str:
    if system is SPRING_MESH:
        return f"particle {axis} index (rest position)"
    return f"node {axis} position (channel {'height' if axis == 'y' else 'length'} coordinate)"


def write_trajectories(trajectories: Trajectories, out: Path, overwrite: bool, normalization: str = "global") -> dict:
    """Compute training statistics, write the store atomically, and return a summary."""
    from dyfcli.store import write_store

    started = time.monotonic()
    stats = training_statistics(trajectories)
    ds = to_dataset(trajectories, stats, normalization)
    write_store(ds, Path(out), overwrite=overwrite, time_chunk=min(trajectories.system.time_chunk,
                                                                     len(trajectories.times)))
    return {
        "out": str(out),
        "system": trajectories.system.name,
        "source": trajectories.source,
        "fields": list(trajectories.system.fields),
        "series": trajectories.count,
        "splits": dict(trajectories.splits),
        "steps": int(len(trajectories.times)),
        "time_step": float(trajectories.time_step),
        "grid": [int(trajectories.mask.shape[1]), int(trajectories.mask.shape[2])],
        "normalization": normalization,
        "statistics": {name: {"mean": m, "std": s} for name, (m, s) in stats.items()},
        "write_seconds": round(time.monotonic() - started, 2),
    }


# ---------------------------------------------------------------------------------------- simulation

SPLIT_KEYS = {"train": 0, "val": 1, "test": 2, OOD_SPLIT: 3}


def trajectory_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of one simulated trajectory: depends only on (seed, split, index).

    So the first trajectories of a split are the same whatever the split sizes (like nn-benchmark's
    nested n25 ⊂ n50 ⊂ n100 training sets), and splits never share initial conditions.
    """
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(SPLIT_KEYS[split], int(index))))


def check_normalization(normalization: str) -> str:
    """`--normalization` of the simulated systems: `global` z-scores or `none` (raw units)."""
    if normalization not in NORMALIZATIONS:
        raise UsageError(f"--normalization {normalization!r}: choose {' or '.join(NORMALIZATIONS)}")
    return normalization


def check_counts(counts: dict[str, int]) -> dict[str, int]:
    """Each split needs at least one trajectory."""
    for name, count in counts.items():
        if count < 1:
            raise UsageError(f"--trajectories: the {name} split needs at least one trajectory, got {count}")
    return counts
