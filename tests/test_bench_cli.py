"""``kfac-bench``: runs on the CPU, checks correctness before timing, writes JSON, markdown and
a plot named after the device."""
from __future__ import annotations

import json

import pytest

from kfac_kernels.apps import bench


def test_kfac_bench_writes_checked_results(tmp_path, capsys):
    code = bench.main(["--device", "cpu", "--ops", "symmetric_factor_update", "gradient_covariance",
                       "--repeats", "1", "--threads", "1", "--out", str(tmp_path)])
    assert code == 0
    files = sorted(p.name for p in tmp_path.iterdir())
    stem = bench.slug(bench.device_name(__import__("torch").device("cpu")))
    assert f"{stem}.json" in files and f"{stem}.md" in files
    data = json.loads((tmp_path / f"{stem}.json").read_text())
    env = data["environment"]
    assert {"device_name", "torch", "python", "threads", "date"} <= set(env)
    ops = {r["op"] for r in data["results"]}
    assert ops == {"symmetric_factor_update", "gradient_covariance"}
    for r in data["results"]:
        assert r["backend"] == "cpu"
        assert r["status"] == "ok" and r["error_vs_eager"] <= 1e-4  # checked before timed
        assert r["speedup"] == pytest.approx(r["eager_s"] / r["backend_s"])
    table = (tmp_path / f"{stem}.md").read_text()
    assert table.count("| symmetric_factor_update |") == 2


def test_failed_check_is_recorded_and_not_timed(tmp_path, monkeypatch):
    real = bench._error
    monkeypatch.setattr(bench, "_error", lambda *a: 1.0)  # every backend result "wrong"
    code = bench.main(["--device", "cpu", "--ops", "symmetric_factor_update", "--repeats", "1",
                       "--out", str(tmp_path)])
    assert code == 1
    data = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert all(r["status"] == "failed check" and "backend_s" not in r for r in data["results"])
    monkeypatch.setattr(bench, "_error", real)


def test_unknown_op_is_an_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--ops", "conv3d"])
    assert "--ops: unknown ['conv3d']" in capsys.readouterr().err


def test_default_output_is_a_fresh_folder_in_the_current_directory(tmp_path, monkeypatch):
    """Without --out nothing is written into the tracked bench/results: a new folder named by
    device and time appears in the current directory."""
    monkeypatch.chdir(tmp_path)
    bench.main(["--device", "cpu", "--ops", "symmetric_factor_update", "--repeats", "1",
                "--threads", "1"])
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1 and folders[0].name.startswith("kfac-bench-")
    assert sorted(p.suffix for p in folders[0].iterdir())[:2] == [".json", ".md"]
    assert not (tmp_path / "bench").exists()
