"""Docs as tests: the README's pipeline block runs as written, command by command, on the `tiny` cohort.

The block is parsed from README.md, never copied here. Only what cannot run in CI is swapped, each listed in
SWAPS: the cohort preset (tiny instead of demo) and the GPU-scale configs for their CPU twins under
configs/demo/ (the ImageNet ResNet-50 needs a download from the Hugging Face hub, which CI does not reach).
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SWAPS = {
    ("features", "synth"): {"+": ["--preset", "tiny"]},
    "configs/extract/resnet50_trunc.yaml": "configs/extract/demo.yaml",
    "configs/mil/abmil_ranking.yaml": "configs/demo/mil_abmil_ranking.yaml",
    "configs/hnm/camelyon16.yaml": "configs/demo/hnm.yaml",
}
HNM_CPU = ["--rounds", "1", "--cohort.slides", "cohort/slides.csv", "--cohort.labels", "cohort/labels.csv",
           "--cohort.annotations", "cohort/annotations", "--extract_options.num_workers", "0",
           # configs/hnm/camelyon16.yaml fits one slide model per round; its CPU twin adds two more seeds
           "--ensemble_seeds", "[]"]


def pipeline_commands(readme: Path = ROOT / "README.md") -> list[list[str]]:
    """The commands of the ```bash block under "## The pipeline", continuation lines joined, comments dropped."""
    text = readme.read_text()
    section = text[text.index("## The pipeline"):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    return [shlex.split(line, comments=True) for line in joined.splitlines() if line.split("#")[0].strip()]


def swapped(command: list[str]) -> list[str]:
    command = [SWAPS.get(token, token) if isinstance(SWAPS.get(token), str) else token for token in command]
    if command[:2] == ["features", "synth"]:
        command += SWAPS[("features", "synth")]["+"]
    if command[:2] == ["mil", "hnm"]:
        rounds = command.index("--rounds")
        command = command[:rounds] + command[rounds + 2:] + HNM_CPU
    return command


def test_pipeline_block_is_found():
    commands = pipeline_commands()
    assert [c[:2] for c in commands][:3] == [["features", "synth"], ["features", "extract"], ["mil", "fit"]]
    assert ["mil", "predict"] in [c[:2] for c in commands] and all("--ckpt_path" not in c for c in commands)


def run(command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def test_readme_pipeline_runs_on_the_tiny_cohort(tmp_path):
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}
    for command in map(swapped, pipeline_commands()):
        result = run(command, tmp_path, env)  # `mil predict` included: no --ckpt_path, the run's best checkpoint
        assert result.returncode == 0, f"{shlex.join(command)}\n{result.stderr[-3000:]}"
    assert (tmp_path / "encoder.safetensors").is_file() and (tmp_path / "runs/abmil_train/predictions.csv").is_file()
    assert any((tmp_path / "heatmaps").glob("*.png"))
