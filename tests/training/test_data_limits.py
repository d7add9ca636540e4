"""Issue 18, medium 3: a CSV upload is parsed as a stream, bounded by the dataset limit."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from training.data import DataError, read_array_file


def _csv(path: Path, rows: int) -> Path:
    path.write_text("a,b\n" + "0,1\n1,0\n" * (rows // 2))
    return path


def test_a_csv_over_the_limit_is_refused_while_it_is_read(tmp_path: Path) -> None:
    path = _csv(tmp_path / "big.csv", 100_000)  # 200,000 cells: 800 kB as float32
    with pytest.raises(DataError, match="this server allows at most 500000") as info:
        read_array_file(str(path), max_bytes=500_000)
    assert info.value.field == "path"
    x, y = read_array_file(str(path), max_bytes=800_000)
    assert x.shape == (100_000, 1) and y.shape == (100_000,)
    assert x.dtype == np.float32 and float(y.sum()) == 50_000


def test_parsing_a_csv_takes_a_few_times_the_file_in_memory(tmp_path: Path) -> None:
    path = _csv(tmp_path / "zeros.csv", 400_000)  # 1.6 MB of text, 800,000 cells
    size = path.stat().st_size
    tracemalloc.start()
    try:
        read_array_file(str(path))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the float64 table is 4x the file, concatenated once; Python lists of the rows took ~37x
    assert peak < 12 * size, (peak, size)


def test_a_bad_cell_in_a_later_block_names_its_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("a,b\n" + "0,1\n" * 100_000 + "x,1\n")
    with pytest.raises(DataError, match="line 100002, column 'a': 'x' is not a number"):
        read_array_file(str(path))
