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


def test_host_ram_bound_for_cpu_offload(capsys):
    """Llama-2-70B, 8 ranks on one node, native ZeRO-3 + CPU offload: each rank moves its shard of fp32
    params, grads and Adam m, v (16 bytes x 68.98e9 / 8 = 137.95 GB) to the host, 1.10 TB per node. 2 TB of
    host RAM fits, 256 GB does not; the planner drops every offload layout that needs more than --host-mem."""
    args = ["estimate-memory", "--model", "llama-2-70b", "--dp", "8", "--zero", "3", "--offload-optimizer", "cpu",
            "--backend", "native", "--json"]
    assert main(args + ["--host-mem", "2TB"]) == 0
    doc = json.loads(capsys.readouterr().out)
    psi = doc["model"]["total_params"]
    assert doc["host_ram_per_node"] == int(16 * psi / 8 * 8) and doc["host_fits"] is True
    assert main(args + ["--host-mem", "256GB"]) == 1
    assert json.loads(capsys.readouterr().out)["host_fits"] is False
    plan = ["plan", "--model", "llama-2-70b", "--gpus", "8", "--gpu-mem", "80GB", "--seq-len", "2048", "--json"]
    assert main(plan) == 0
    free = json.loads(capsys.readouterr().out)
    assert any(c["setup"]["offload_optimizer"] == "cpu" for c in free["feasible"])
    main(plan + ["--host-mem", "256GB"])
    bounded = json.loads(capsys.readouterr().out)
    assert not any(c["setup"]["offload_optimizer"] == "cpu" for c in bounded["feasible"])
    assert any("over --host-mem" in r["reason"] for r in bounded["rejected"])


def test_interleaved_1f1b_is_accepted_and_named(capsys):
    """The estimator models interleaved 1F1B: the CLI offers it and a bad schedule's error lists it."""
    import pytest

    from trellis.engine.memory.estimator import TrainingSetup, estimate
    from trellis.engine.memory.models import resolve_model
    from trellis.errors import ConfigError

    assert main(["estimate-memory", "--model", "tiny-llama", "--pp", "2", "--grad-accum", "4", "--seq-len", "64",
                 "--pp-schedule", "interleaved_1f1b"]) == 0
    with pytest.raises(ConfigError, match="use 1f1b, gpipe, interleaved_1f1b|use gpipe, 1f1b, interleaved_1f1b"):
        estimate(resolve_model("tiny-llama"), TrainingSetup(pp=2, grad_accum=2, pp_schedule="zb"))


def test_explain_prints_deepspeed_estimator_side_by_side(capsys):
    """--backend deepspeed --explain at ZeRO-3 + full offload, 4 nodes x 8: DeepSpeed's own figure (its function
    called here directly, largest layer = Llama-2-7B's embedding, 32000 x 4096) next to trellis', which is no
    longer 0 on the GPU (the gathered largest module and its bf16 grads)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    from trellis.commands.memory import fmt
    from trellis.engine.memory.models import resolve_model, total_params

    args = ["estimate-memory", "--model", "llama-2-7b", "--backend", "deepspeed", "--dp", "32", "--zero", "3",
            "--precision", "bf16", "--offload-optimizer", "cpu", "--offload-param", "cpu", "--explain"]
    assert main(args) == 0
    out = capsys.readouterr().out
    cpu, gpu, _ = estimate_zero3_model_states_mem_needs(total_params(resolve_model("llama-2-7b")), 32000 * 4096,
                                                        num_gpus_per_node=8, num_nodes=4)
    row = next(line for line in out.splitlines() if line.strip().startswith("per GPU"))
    assert "vs DeepSpeed's own estimator (estimate_zero3_model_states_mem_needs, 4 node(s) x 8 GPUs" in out
    assert row.split()[-2:] == fmt(gpu).split() and row.split()[-4:-2] == fmt(2 * 2 * 32000 * 4096).split()
    assert fmt(cpu) in out
