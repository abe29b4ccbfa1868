"""Tiny synthetic data stores for tests of the layers above `prepare` (training, forecast, evaluate).

`make_store` writes a real Zarr data store through `dyfcli.store.write_store`: smooth travelling waves
(so a network can learn something in a few steps), optional NaN land, optional `cond_` fields, and
either series-based splits (like simulations) or date-based splits (like SST).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import xarray as xr

from dyfcli.store import provenance_attrs, write_store


def make_store(
    path: Path,
    *,
    fields: tuple[str, ...] = ("u", "v"),
    series: int = 4,
    steps: int = 24,
    grid: tuple[int, int] = (8, 12),
    dated: bool = False,
    land: bool = False,
    cond: tuple[str, ...] = (),
    normalization: str = "global",
    seed: int = 0,
) -> Path:
    rng = np.random.default_rng(seed)
    ny, nx = grid
    yy, xx = np.meshgrid(np.linspace(0, 1, ny), np.linspace(0, 1, nx), indexing="ij")
    t = np.arange(steps, dtype=np.float64)
    data = {}
    for f_index, name in enumerate(fields):
        phase = rng.uniform(0, 2 * np.pi, size=(series, 1, 1, 1))
        wave = np.sin(2 * np.pi * (xx[None, None] - 0.05 * t[None, :, None, None]) + phase + f_index)
        wave = wave * (1 + 0.3 * yy[None, None]) + 10.0 * f_index
        data[name] = wave.astype(np.float32)
    mask = np.ones((series, ny, nx), dtype=bool)
    if land:
        mask[:, : max(1, ny // 4), : max(1, nx // 4)] = False
        for name in fields:
            data[name][:, :, ~mask[0]] = np.nan
    coords = {"series": np.arange(series), "y": np.arange(ny), "x": np.arange(nx)}
    if dated:
        coords["time"] = np.datetime64("2000-01-01") + np.arange(steps).astype("timedelta64[D]")
    else:
        coords["time"] = t * 0.5
    ds = xr.Dataset(coords=coords)
    for name in fields:
        ds[name] = (("series", "time", "y", "x"), data[name], {"units": "1"})
    ds["mask"] = (("series", "y", "x"), mask)
    for name in cond:
        ds[f"cond_{name}"] = (("series", "y", "x"), (rng.random((series, ny, nx)) > 0.8).astype(np.float32))
    if normalization == "global":
        for name in fields:
            ds[f"stats_mean_{name}"] = ((), np.float32(np.nanmean(data[name])))
            ds[f"stats_std_{name}"] = ((), np.float32(np.nanstd(data[name])))
    elif normalization == "pixel":
        for name in fields:
            ds[f"stats_mean_{name}"] = (("series", "y", "x"), np.nanmean(data[name], axis=1))
            ds[f"stats_std_{name}"] = (("series", "y", "x"), np.nanstd(data[name], axis=1) + 1e-3)
    else:
        raise ValueError(normalization)
    if dated:
        days = coords["time"]
        third = steps // 3
        splits = {"train": {"time": [None, str(days[steps - 2 * third - 1])]},
                  "val": {"time": [str(days[steps - 2 * third]), str(days[steps - third - 1])]},
                  "test": {"time": [str(days[steps - third]), None]}}
        time_step = "1D"
    else:
        n_val = max(1, series // 4)
        splits = {"train": {"series": list(range(series - 2 * n_val))},
                  "val": {"series": list(range(series - 2 * n_val, series - n_val))},
                  "test": {"series": list(range(series - n_val, series))}}
        time_step = 0.5
    ds.attrs.update(provenance_attrs("synthetic test store", {"seed": seed}))
    ds.attrs.update({"dyf_fields": list(fields), "dyf_splits": splits, "dyf_normalization": normalization,
                     "dyf_time_step": time_step})
    return write_store(ds, Path(path))


def make_untrained_checkpoint(store, path: Path, seed: int = 0, overrides: tuple[str, ...] = (),
                              preset: str = "tiny") -> Path:
    """An untrained DYffusion `model.pt` of `preset` for `store`, saved the way train-forecaster saves one.

    `overrides` are `--set` strings applied to the preset (e.g. a network width for benchmarks).
    """
    import torch

    from dyfcli.checkpoint import Checkpoint, save_checkpoint, store_identity
    from dyfcli.config import load_config
    from dyfcli.data import Normalizer
    from dyfcli.model import build_forecaster, build_interpolator

    torch.manual_seed(seed)
    config = load_config(preset, list(overrides))
    fields, conditions = len(store.fields), len(store.cond_names)
    interpolator = build_interpolator(config, fields, conditions)
    forecaster = build_forecaster(config, fields, conditions)
    common = dict(method="dyffusion", config=config.to_dict(), fields=store.fields, grid=store.grid,
                  cond_names=store.cond_names, normalizer=Normalizer.from_store(store).get_state(),
                  store=store_identity(store))
    inner = Checkpoint(kind="interpolator", state_dict=interpolator.state_dict(), **common)
    save_checkpoint(path, Checkpoint(kind="forecaster", state_dict=forecaster.state_dict(), interpolator=inner,
                                     **common))
    return path


def make_untrained_baseline(store, path: Path, kind: str, overrides: tuple[str, ...] = (), seed: int = 0) -> Path:
    """An untrained `kind` baseline checkpoint (dropout, perturbation, ddpm, mcvd) of the tiny preset for
    `store`, saved the way train-forecaster saves one."""
    import torch

    from dyfcli.baselines import training_method
    from dyfcli.checkpoint import Checkpoint, save_checkpoint, store_identity
    from dyfcli.config import load_config
    from dyfcli.data import Normalizer

    torch.manual_seed(seed)
    config = load_config("tiny", list(overrides))
    method = training_method(kind, config, len(store.fields), len(store.cond_names))
    save_checkpoint(path, Checkpoint(
        kind=kind, method=kind, config=config.to_dict(), fields=store.fields, grid=store.grid,
        cond_names=store.cond_names, normalizer=Normalizer.from_store(store).get_state(),
        store=store_identity(store), state_dict=method.network.state_dict()))
    return path
