import os
import subprocess
import sys
from pathlib import Path

import pytest

# Plain progress lines every 0.2 s in tests, so the non-terminal path is exercised.
os.environ.setdefault("DYF_PROGRESS_INTERVAL", "0.2")

REPO = Path(__file__).resolve().parents[1]

# Tests run two workers on two cores (pytest -n 2): one torch thread each avoids oversubscription, which
# made tiny-network tests up to 40x slower. Subprocesses of `dyf` get the same setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def run_dyf(*args: str, check: int | None = 0, timeout: float = 600, env: dict | None = None):
    """Run the real `dyf` command in a subprocess; assert its exit code when `check` is not None."""
    exe = Path(sys.executable).with_name("dyf")
    cmd = [str(exe), *args] if exe.exists() else [sys.executable, "-m", "dyfcli", *args]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check is not None:
        assert proc.returncode == check, (
            f"dyf {' '.join(args)} exited {proc.returncode}, expected {check}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def dyf():
    return run_dyf


@pytest.fixture
def tiny_store(tmp_path):
    from storefactory import make_store

    return make_store(tmp_path / "tiny.zarr")
