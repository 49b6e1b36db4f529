"""The README is the user's door: its first example runs as written on a CPU, and the command
output it shows is what the command prints."""
import os
import re
import subprocess
import sys
from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")


def _blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def test_first_example_runs_on_a_cpu_as_written():
    code = _blocks("python")[0]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", FUSED_TAU_BACKEND="")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert re.fullmatch(r"loss \d+\.\d{4}, dL/dtau -?\d+\.\d{4}\n", done.stdout), done.stdout


def test_table_output_shown_is_what_the_command_prints():
    m = re.search(r"`fused-tau (table [^`]*)` prints:\n\n```\n(.*?)```", README, flags=re.S)
    assert m, "the README shows a fused-tau table command and its output"
    args, shown = m.group(1).split(), m.group(2)
    done = subprocess.run([sys.executable, "-m", "fused_tau", *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout == shown
