"""Attributes as dyf writes them to disk, so that stores open in other tools (docs/design.md §9).

Two jobs, both applied by every writer of a store or scores file just before `to_zarr`/`to_netcdf`
(`for_writing`), and undone by every reader (`decode`):

- **JSON values.** NetCDF takes as an attribute value only a string, a number or a flat list of numbers
  or of strings (no dict, no bool, no None, no nested or mixed list), so `xr.open_zarr(store).to_netcdf()`
  failed on `dyf_recipe`, `dyf_network_calls`, `dyf_complete`. Such values are written as JSON strings and
  their names listed in the attribute `dyf_json_attrs`; `decode` parses exactly those back. Values NetCDF
  takes are written as they are (other tools read `dyf_fields` as a list). Stores written before this
  (nested values stored as they were, no `dyf_json_attrs`) decode to themselves.
- **CF coordinates.** `time`, `init_time`, `valid_time` get `standard_name: time` (datetimes: xarray
  writes `units` and `calendar` itself from the encoding); `lead_time` gets units (timedeltas: from
  xarray); `lat`/`lon` get `standard_name` latitude/longitude and `units` degrees_north/east. Attributes
  a source already gave are kept.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import numpy as np

JSON_ATTRS = "dyf_json_attrs"
TIME_COORDS = ("time", "init_time", "valid_time")
GEO_COORDS = {"lat": ("latitude", "degrees_north"), "lon": ("longitude", "degrees_east"),
              "latitude": ("latitude", "degrees_north"), "longitude": ("longitude", "degrees_east")}


# ----------------------------------------------------------------------------------------------- values

def encode(attrs: Mapping) -> dict:
    """`attrs` with every value NetCDF cannot hold as a JSON string, their names in `dyf_json_attrs`."""
    plain = {str(key): _plain(value) for key, value in attrs.items() if key != JSON_ATTRS}
    encoded = sorted(key for key, value in plain.items() if not netcdf_safe(value))
    result = {key: json.dumps(value) if key in encoded else value for key, value in plain.items()}
    if encoded:
        result[JSON_ATTRS] = encoded
    return result


def decode(attrs: Mapping) -> dict:
    """The values `encode` wrote, parsed back; attributes of older stores (no `dyf_json_attrs`) as they are.

    A listed value that is no longer a string (changed in memory since it was read) is kept as it is.
    """
    names = attrs.get(JSON_ATTRS, [])
    names = [names] if isinstance(names, str) else list(np.asarray(names, dtype=str).ravel())
    result = {key: value for key, value in attrs.items() if key != JSON_ATTRS}
    for name in names:
        if isinstance(result.get(name), str):
            try:
                result[name] = json.loads(result[name])
            except ValueError:  # edited by hand into a plain string: keep what is there
                pass
    return result


def netcdf_safe(value) -> bool:
    """A value NetCDF (and Zarr) store as it is: a string, a number (not a bool), or a non-empty flat
    list of numbers or of strings."""
    if isinstance(value, bool):
        return False
    if isinstance(value, (str, int, float)):
        return True
    if isinstance(value, list) and value:
        return (all(isinstance(v, str) for v in value)
                or all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value))
    return False


def _plain(value):
    """Plain Python values: numpy scalars and arrays, tuples and paths become numbers, lists and strings."""
    return json.loads(json.dumps(value, default=_default))


def _default(value):
    if isinstance(value, np.ndarray):
        return value.tolist()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


# ----------------------------------------------------------------------------------------------- datasets

def for_writing(ds):
    """A shallow copy of the xr.Dataset `ds` with CF coordinate attributes added and every attribute
    dict (the dataset's and each variable's) encoded for NetCDF; `ds` itself is left unchanged."""
    ds = ds.copy()
    add_cf_coordinates(ds)
    ds.attrs = encode(decode(ds.attrs))
    for name in ds.variables:
        ds[name].attrs = encode(decode(ds[name].attrs))
    return ds


def decoded(ds):
    """`ds` (an xr.Dataset read from disk) with its own and its variables' attributes decoded, in place."""
    ds.attrs = decode(ds.attrs)
    for name in ds.variables:
        if JSON_ATTRS in ds[name].attrs:
            ds[name].attrs = decode(ds[name].attrs)
    return ds


def add_cf_coordinates(ds) -> None:
    """CF attributes on the coordinates dyf writes (in place; attributes already there are kept)."""
    for name in TIME_COORDS:
        if name in ds.variables:
            _time_attrs(ds[name], axis=name == "time")
    if "lead_time" in ds.variables:
        lead = ds["lead_time"]
        lead.attrs.setdefault("long_name", "forecast lead time")
        if not np.issubdtype(lead.dtype, np.timedelta64):
            lead.attrs.setdefault("units", "1")
    for name, (standard_name, units) in GEO_COORDS.items():
        if name in ds.variables:
            ds[name].attrs.setdefault("standard_name", standard_name)
            ds[name].attrs.setdefault("units", units)


def _time_attrs(coord, axis: bool) -> None:
    """Datetimes: `standard_name` only, since xarray writes `units` and `calendar` from the encoding (an
    attribute of that name would clash); other times need units, `1` when nothing better is known."""
    if np.issubdtype(coord.dtype, np.datetime64):
        coord.attrs.setdefault("standard_name", "time")
        coord.encoding.setdefault("calendar", "proleptic_gregorian")
    else:
        coord.attrs.setdefault("units", "1")
        if " since " in str(coord.attrs["units"]) or coord.attrs["units"] in ("s", "seconds", "h", "hours", "days"):
            coord.attrs.setdefault("standard_name", "time")
    if axis:
        coord.attrs.setdefault("axis", "T")
