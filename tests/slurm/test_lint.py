"""Every shell script we ship (SLURM jobs, launch helpers) parses and passes shellcheck."""
import shutil
import subprocess

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted([*ROOT.glob("slurm/*.sbatch"), *ROOT.glob("slurm/*.sh"), *ROOT.glob("launch/*.sh"), ROOT / ".ci" / "run"])


def test_the_list_covers_the_slurm_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"prepare_data.sbatch", "submit_prepare.sh", "pretrain.sbatch", "submit_all.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_parse_and_lint(script):
    subprocess.run(["bash", "-n", str(script)], check=True)
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck not installed (.ci/run installs it)")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout
