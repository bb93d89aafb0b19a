"""`trellis estimate-memory` / `trellis plan` through the real CLI entry (in process): exit codes, JSON, plot."""

from __future__ import annotations

import json

from trellis.cli import main


def test_json_and_fits_exit_codes(capsys):
    assert main(["estimate-memory", "--params", "7.5B", "--dp", "64", "--zero", "3", "--json", "--gpu-mem", "80GB"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["fits"] is True and doc["worst_rank"]["total"] == 1_875_000_000
    assert main(["estimate-memory", "--params", "7.5B", "--zero", "0", "--gpu-mem", "80GB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_user_errors_exit_2(capsys):
    assert main(["estimate-memory", "--model", "lama-2-7b"]) == 2
    assert "did you mean" in capsys.readouterr().err
    assert main(["estimate-memory", "--model", "llama-2-7b", "--tp", "3"]) == 2
    assert main(["estimate-memory"]) == 2


def test_config_file_and_explain(capsys, repo):
    assert main(["estimate-memory", "--config", str(repo / "configs" / "tiny-llama.toml"), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "dp=2" in out and "Korthikanti" in out and "master copy" in out


def test_plan_prints_snippet_and_plot(capsys, tmp_path):
    png = tmp_path / "plan.png"
    rc = main(["plan", "--model", "llama-2-7b", "--gpus", "8", "--gpu-mem", "80GB", "--seq-len", "2048",
               "--global-batch", "32", "--plot", str(png)])
    out = capsys.readouterr().out
    assert rc == 0 and "[parallel]" in out and "micro_batch_size" in out
    assert png.stat().st_size > 1000
    assert main(["plan", "--model", "llama-2-70b", "--gpus", "1", "--gpu-mem", "1GB"]) == 1
    assert "no layout fits" in capsys.readouterr().out
