"""Training under torchrun with 2 gloo ranks on CPU, data parallel (DDP) and sharded
(FSDP), against one process with the same global batch: the same losses (up to float32
reduction order), the same final evaluation, one writer, and checkpoints that resume under
another layout (DDP -> one process, one process -> FSDP, FSDP -> DDP)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from archkit.distributed import Layout
from archkit.spec import SpecError

ROOT = Path(__file__).resolve().parents[1]
SPEC = str(ROOT / "specs/rule110_cpu.yaml")
# 20 steps lie inside the spec's 100 warmup steps, so the learning rate of a step does not
# depend on the train.steps a run started with: a 10-step run extended to 20 steps takes
# the steps of an uninterrupted 20-step run.
SETTINGS = ["train.log_every=1", "train.eval_every=10", "train.checkpoint_every=10",
            "train.threads=1", "train.eval_size=128"]
# float32 sums in another order: measured up to 2.4e-6 relative over 20 steps
LOSS_RTOL = 1e-4


def train(runs: Path, name: str, steps: int, ranks: int, resume: bool = False,
          parallel: str = "ddp") -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc_per_node={ranks}"] if ranks > 1 else [sys.executable]
    command = [*launcher, "-m", "archkit", "train", "--runs", str(runs), "--name", name,
               "--no-progress", *(f"--set={s}" for s in [*SETTINGS, f"train.steps={steps}",
                                          f"train.parallel={parallel}"])]
    command += ["--resume"] if resume else [SPEC]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    assert [r["step"] for r in train] == list(range(1, len(train) + 1))  # each step once
    return [r["loss"] for r in train]


def starts(run: Path) -> list[int]:
    return [json.loads(line)["from_step"]
            for line in (run / "commands.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("ddp")
    train(runs, "one", 20, ranks=1)
    train(runs, "two", 20, ranks=2)
    train(runs, "two_then_one", 10, ranks=2)
    train(runs, "two_then_one", 20, ranks=1, resume=True)
    train(runs, "one_then_fsdp", 10, ranks=1)
    train(runs, "one_then_fsdp", 20, ranks=2, resume=True, parallel="fsdp")
    train(runs, "fsdp_then_two", 10, ranks=2, parallel="fsdp")
    train(runs, "fsdp_then_two", 20, ranks=2, resume=True)
    return runs


def test_two_ranks_take_the_steps_of_one_process_with_the_same_global_batch(runs: Path
                                                                           ) -> None:
    one, two = losses(runs / "one"), losses(runs / "two")
    assert len(one) == len(two) == 20
    assert two == pytest.approx(one, rel=LOSS_RTOL)
    assert two[-1] < two[0]  # it trained
    final_one = json.loads((runs / "one/final.json").read_text())
    final_two = json.loads((runs / "two/final.json").read_text())
    assert final_two.pop("loss") == pytest.approx(final_one.pop("loss"), rel=LOSS_RTOL)
    assert final_two == final_one  # exact, per_answer and chance, overall and per t
    evaluations = [json.loads(line) for line in (runs / "two/metrics.jsonl").read_text()
                   .splitlines() if json.loads(line)["kind"] == "eval"]
    assert [e["step"] for e in evaluations] == [10, 20]
    # rank 0 alone wrote: one command line, one set of event files
    assert starts(runs / "two") == [0]
    assert len(list((runs / "two").glob("events.out.tfevents.*"))) == 2  # scalars, hparams


def test_sharded_training_takes_the_steps_of_data_parallel_training(runs: Path) -> None:
    """FSDP's first 10 steps (fsdp_then_two) against DDP's, and FSDP resumed from one
    process's checkpoint (one_then_fsdp) against that process continuing."""
    assert losses(runs / "fsdp_then_two")[:10] == pytest.approx(losses(runs / "two")[:10],
                                                               rel=LOSS_RTOL)
    assert losses(runs / "one_then_fsdp")[10:] == pytest.approx(losses(runs / "one")[10:],
                                                               rel=LOSS_RTOL)


def test_a_checkpoint_resumes_under_the_other_layout(runs: Path) -> None:
    one = losses(runs / "one")
    for name in ("two_then_one", "one_then_fsdp", "fsdp_then_two"):
        resumed = losses(runs / name)
        assert starts(runs / name) == [0, 10], name  # resumed at step 10, not restarted
        assert resumed == pytest.approx(one, rel=LOSS_RTOL), name
        final = json.loads((runs / name / "final.json").read_text())
        assert final["exact"] == json.loads((runs / "one/final.json").read_text())["exact"]


def test_a_global_batch_must_split_into_equal_slices() -> None:
    Layout(0, 2).check_batch_size(64)
    with pytest.raises(SpecError, match="multiple of the 3 ranks"):
        Layout(1, 3).check_batch_size(64)
