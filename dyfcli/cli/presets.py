"""`dyf presets`: list the shipped presets, one line each, so a user can pick one (or a base to `extends:`)
without reading the package's files. Human output goes to stdout, to be piped; `--json` gives the list."""

from __future__ import annotations

import sys
from pathlib import Path

from dyfcli.cli.app import OPTIONS, app, run_command


def list_presets() -> dict:
    """`{"presets": [{"name", "description", "path"}, ...]}` sorted by name; a name in several preset folders
    is the one `--preset NAME` would use (the installed package before the source checkout)."""
    from dyfcli.config import named_preset, preset_names

    presets = []
    for name in preset_names():
        path = named_preset(name)
        presets.append({"name": name, "description": describe_preset(path), "path": str(path)})
    return {"presets": presets}


def describe_preset(path: Path) -> str:
    """The first line of the preset's `description:` key, else of its leading comment, else "".

    Read as text, not validated: listing should work even when one preset is broken (loading it says why).
    """
    from dyfcli.config import parse_yaml
    from dyfcli.errors import ConfigError

    text = path.read_text()
    try:
        document = parse_yaml(text, str(path))
    except ConfigError:
        document = None
    description = document.get("description") if isinstance(document, dict) else None
    if isinstance(description, str) and description.strip():
        return description.strip().splitlines()[0]
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if line.lstrip("#").strip():
            return line.lstrip("#").strip()
    return ""


def _render(summary: dict) -> str:
    """One `name  description` line per preset on stdout (nothing on stderr); under --json only the document."""
    if not OPTIONS.json:
        width = max((len(p["name"]) for p in summary["presets"]), default=0)
        for preset in summary["presets"]:
            print(f"{preset['name']:<{width}}  {preset['description']}".rstrip())
        sys.stdout.flush()
    return ""


@app.command("presets")
def presets_command() -> None:
    """List the shipped presets (for --preset NAME or `extends: NAME` in your own YAML file)."""
    run_command("presets", list_presets, _render)
