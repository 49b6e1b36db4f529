"""Helpers shared by the command-line tests (tests/test_cli.py, tests/test_cli_demos.py)."""
import math
import re
from pathlib import Path

import pytest
import torch

from fused_tau import cli


ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def _default_dispatch(monkeypatch):
    """The CLI runs whatever dispatch picks: no forced backend unless a test sets one."""
    monkeypatch.delenv("FUSED_TAU_BACKEND", raising=False)


def run(capsys, *argv):
    """``fused-tau argv...`` in-process: (exit code, stdout, stderr)."""
    code = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def columns(header, lines):
    """Rows of a right-aligned text table as lists of cells (empty strings kept): each column ends
    where its header ends; header cells are separated by two spaces or more."""
    ends = [m.end() for m in re.finditer(r"\S+(?: \S+)*", header)]
    return [[line[start:end].strip() for start, end in zip([0] + ends[:-1], ends)] for line in lines]


def table_after(text, header_start):
    """The rows of the table whose header line starts (stripped) with ``header_start``."""
    lines = text.splitlines()
    i = next(k for k, line in enumerate(lines) if line.strip().startswith(header_start))
    body = []
    for line in lines[i + 1:]:
        if not line.strip() or line.startswith("wrote "):
            break
        body.append(line)
    return columns(lines[i], body)


def parse_table_output(text):
    """``fused-tau table`` output -> {title: {tau: {"rows": [class rows], "scalars": first row}}}."""
    blocks = text.strip().split("\n\n")[1:]  # the first block is the legend
    parsed = {}
    for block in blocks:
        title, header, *lines = block.splitlines()
        names = [m.group() for m in re.finditer(r"\S+(?: \S+)*", header)]
        groups, current = {}, None
        for cells in columns(header, lines):
            row = dict(zip(names, cells))
            if row["tau"]:
                current = groups.setdefault(float(row["tau"]), [])
            current.append(row)
        parsed[title] = groups
    return parsed


def vector(cell):
    return [float(v) for v in cell.strip("[]").split(",")]


def assert_png(path):
    """``path`` is a PNG of real content: valid signature, tens of KB, many colours, not blank."""
    from matplotlib.image import imread

    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > 20_000
    pixels = torch.from_numpy(imread(path)[..., :3].copy())
    assert pixels.shape[0] > 300 and pixels.shape[1] > 300
    assert pixels.std() > 0.05
    assert len(torch.unique(pixels.reshape(-1, 3), dim=0)) > 50


def close(printed, exact, digits=5):
    """A number printed to ``digits`` significant digits equals ``exact`` to half a unit of the last."""
    return abs(printed - exact) <= 0.51 * 10 ** (math.floor(math.log10(abs(exact))) - digits + 1) if exact else \
        printed == 0
