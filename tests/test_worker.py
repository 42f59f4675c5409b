"""The training worker's step on 2 gloo processes, without Ray: every objective learns a fixed batch and makes no host
sync in the GPU configuration (but DeepSpeed's clipping check), bf16 exports float32 master weights,
`grad_accum` counts one step per window, a new worker group resumes at the latest checkpoint, and SynCLR's
resume restores its teacher and schedule."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch.multiprocessing as mp

import worker_harness as harness
from procs import free_port
from synray.train.objectives import OBJECTIVES


@pytest.fixture(scope="module")
def results(tiny_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every case of the harness, run once by one group of 2 processes: case -> [rank 0 result, rank 1 result]."""
    root = tmp_path_factory.mktemp("worker")
    names = list(harness.CASES)
    mp.spawn(harness.worker, args=(free_port(), str(root), tiny_models["text"], names),
             nprocs=harness.WORLD, join=True)
    return {n: [json.loads((root / n / f"rank{r}.json").read_text()) for r in range(harness.WORLD)] for n in names}


def _losses(result: dict[str, Any]) -> list[float]:
    return [r["loss"] for r in result["reports"] if "loss" in r]


@pytest.mark.parametrize("objective", list(OBJECTIVES))   # every registry entry
def test_every_objective_lowers_its_loss_on_a_fixed_batch(results, objective: str):
    rank0, rank1 = results[objective]
    losses = _losses(rank0)
    assert rank0["final_step"] == 8 and len(losses) == 8
    assert losses[-1] < 0.8 * losses[0], losses
    assert _losses(rank1) == losses  # the logged loss is the mean over ranks, the same on both


@pytest.mark.parametrize("objective", list(OBJECTIVES))   # every registry entry
def test_the_worker_reports_the_step0_export_first_and_the_trained_export_last(results, objective: str):
    reports = results[objective][0]["reports"]
    assert reports[0]["init_export"] and reports[0]["step"] == 0 and reports[0]["checkpoint"]
    assert reports[-1]["step"] == 8 and reports[-1]["checkpoint"]


def test_grad_accum_applies_one_update_per_window(results):
    for rank in results["grad_accum"]:
        assert rank["boundaries"] == [False, True, False, True]
        sums = rank["weight_sums"]  # before, then after each of the 4 micro-steps
        assert sums[1] == sums[0] and sums[2] != sums[1] and sums[3] == sums[2] and sums[4] != sums[3]
        assert rank["global_steps"] == 2 and rank["scheduler_steps"] == 2
        assert rank["final_step"] == 2 and rank["train_global_steps"] == 2


def test_a_new_worker_group_resumes_at_the_latest_checkpoint(results):
    for rank in results["resume"]:
        assert rank["first_final_step"] == 6
        assert rank["restarted"] and rank["restored_step"] == 6 and rank["same_weights"]
    steps_with_checkpoints = [r["step"] for r in results["resume"][0]["reports"] if r["checkpoint"]]
    assert steps_with_checkpoints == [0, 2, 4, 6]


def test_synclr_resume_restores_the_teacher_exactly_and_the_ema_schedule_at_its_step(results):
    for rank in results["synclr_resume"]:
        assert rank["first_final_step"] == 6 and rank["restored_step"] == 6
        assert rank["first_teacher"] != rank["init_teacher"]          # the EMA moved the teacher
        assert rank["first_teacher"] != rank["first_student"]         # ... and it lags the student
        assert rank["restored_teacher"] == rank["first_teacher"]      # restored bit for bit
        assert rank["restored_student"] == rank["first_student"]
        assert rank["export_is_teacher"]                              # the export is the teacher's backbone
        # the first update after the resume moves the teacher with the momentum of step 6 of 6 (0.99), not step 0's
        assert rank["ema_momentum"] == pytest.approx(0.99) and rank["ema_error"] < 1e-6
    assert results["synclr_resume"][0]["restored_teacher"] == results["synclr_resume"][1]["restored_teacher"]


#: the one host read DeepSpeed's ZeRO keeps when it clips: the validity of the global norm, once per optimizer step
DEEPSPEED_CLIP_CHECK = {("read", "__bool__", "is_invalid_grad_norm"), ("blocking copy", "tensor",
                                                                        "mask_nan_or_inf_with_val_inplace")}


@pytest.mark.parametrize("objective", list(OBJECTIVES))   # every registry entry
def test_the_gpu_step_makes_no_host_sync(results, objective: str):
    """bf16, ZeRO 1 and gradient accumulation, each objective's own augmentation: no micro-step reads a device value
    on the host, sizes a tensor by its data, copies to the device blocking, or synchronises (the CPU account of
    synray.train.syncguard; on a GPU, CUDA's sync debug mode joins it). The one exception is DeepSpeed's check of
    the clipping norm, at optimizer steps of the objectives that clip (SynCLR does not)."""
    for rank in results[f"no_host_sync_{objective}"]:
        assert rank["dtype"] == "torch.bfloat16"            # the module DeepSpeed trains is bf16, as on GPUs
        steps = rank["micro_steps"]
        assert [s["boundary"] for s in steps] == [False, True, False, True]
        for s in steps:
            found = {(kind, call, where.rsplit("(", 1)[-1].rstrip(")")) for kind, call, where in s["syncs"]}
            allowed = DEEPSPEED_CLIP_CHECK if s["boundary"] and rank["grad_clip"] > 0 else set()
            assert found <= allowed, s["syncs"]
        if objective == "synclr":
            assert rank["grad_clip"] == 0 and all(not s["syncs"] for s in steps)


def test_bf16_training_exports_the_float32_master_weights(results):
    """The export holds the optimizer's float32 weights (DeepSpeed's own zero_to_fp32 consolidation of the
    checkpoint), not the bf16 module's rounding of them."""
    rank0 = results["bf16_export"][0]
    assert rank0["module_dtype"] == "torch.bfloat16" and rank0["export_dtypes"] == ["torch.float32"]
    assert rank0["compared"] > 10 and rank0["max_difference"] == 0.0
    assert rank0["bf16_rounding"] > 0.0   # the weights are not all bf16 values: the export is not the bf16 module


def test_replay_keeps_training_while_the_stream_is_slow_and_records_each_row_once(results):
    """Each streamed row used up to 3 times: the worker waits for the stream in a smaller share of its time, trains
    about 3 times the steps on the same rows, and the checkpoint's record of trained rows holds each row once (all
    but less than a batch of each rank's rows), matching the rows_trained it reports."""
    once, thrice = results["replay_1"][0], results["replay_3"][0]

    def wait_share(result: dict[str, Any]) -> float:
        waits = [r["data_wait_fraction"] for r in result["reports"] if "data_wait_fraction" in r]
        return sum(waits) / len(waits)

    assert wait_share(thrice) < 0.7 * wait_share(once), (wait_share(thrice), wait_share(once))
    rows_streamed = once["rows_streamed"] * harness.WORLD
    per_step = harness.ROWS * harness.WORLD
    assert once["final_step"] == rows_streamed // per_step
    assert 2.5 * once["final_step"] <= thrice["final_step"] <= 3 * once["final_step"]
    for result in (once, thrice):
        consumed = result["consumed"]
        last = result["reports"][-1]
        assert len(consumed) == len(set(consumed)) == last["rows_trained"]
        assert rows_streamed - len(consumed) < per_step
        assert last["uses_per_row"] == pytest.approx(result["final_step"] * per_step / len(consumed))
    assert thrice["reports"][-1]["uses_per_row"] > 2.5 and once["reports"][-1]["uses_per_row"] == 1.0


def test_a_preemption_notice_saves_a_checkpoint_and_holds_training_until_the_notice_ends(results):
    """Every rank asks at every report; the notice stands at the 3rd question and the 4th: a checkpoint at step 3
    with the notice in its metrics, then the group holds (asking once a second) until the notice is gone, and goes
    on to its last checkpoint at the step budget."""
    for rank in results["preemption"]:
        assert rank["final_step"] == 6 and rank["asked"] == 6 + 2   # one question a report, two while holding
        saved = [(r["step"], r.get("preemption")) for r in rank["reports"] if r["checkpoint"] and r["step"]]
        assert saved == [(3, {"deadline_ms": 1_000_000, "ranks": [1]}), (6, None)], saved
