"""The built wheel installs into a fresh virtualenv and provides a working `gemma-mtp`."""

import os
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=600,
    )
    (wheel,) = wheels.glob("mlx_gemma_mtp-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True, timeout=600)
    # Dependencies come from this environment (a .pth line adds its site-packages without running
    # its .pth files, so the editable install of the source tree stays out of the way).
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    where = subprocess.run(
        [python, "-c", "import mlx_gemma_mtp.convert, mlx_gemma_mtp.cli as c; print(c.__file__)"],
        capture_output=True, text=True, check=True, cwd=tmp_path,
    ).stdout.strip()
    assert where.startswith(str(env_dir))

    result = subprocess.run([env_dir / "bin" / "gemma-mtp", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "convert" in result.stdout
    result = subprocess.run([env_dir / "bin" / "gemma-mtp", "convert", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--draft-q-bits" in result.stdout

    # the demo pair is package data: the README's first command works from the wheel, offline
    result = subprocess.run(
        [env_dir / "bin" / "gemma-mtp", "generate", "--demo", "--prompt", "def parse_args(argv):", "--max-tokens", "16"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("def parse_args(argv):") and "tok/s" in result.stderr
    result = subprocess.run([env_dir / "bin" / "gemma-mtp", "train-drafter", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "--init" in result.stdout
