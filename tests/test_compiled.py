"""``train.compile`` / ``archkit bench --compile``: torch.compile of the window passes and
the wake step gives the eager numbers, compiles each path once (not per window, pass or
step), and falls back to eager mode with one warning when the backend fails."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from archkit.compiled import CompiledOrEager
from archkit.sleep import SleepingModel
from archkit.spec import Spec, load_spec
from archkit.trainer import train

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny", "model.d_model": 32, "model.blocks.gated_delta.head_dim": 16,
    "task.width": 6, "task.states": 2, "sleep.window": 6, "sleep.passes": 2,
    "train.steps": 5, "train.batch_size": 8, "train.warmup_steps": 1,
    "train.eval_every": 5, "train.eval_size": 16, "train.checkpoint_every": 5,
    "train.threads": 1,
}


def tiny_spec(**overrides: object) -> Spec:
    return load_spec(ROOT / "specs/rule110_cpu.yaml", {**TINY, **overrides})


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_compiled_training_equals_eager_and_compiles_each_path_once(tmp_path: Path) -> None:
    eager = train(tiny_spec(), tmp_path / "eager", progress=False)
    torch._dynamo.reset()
    counters.clear()
    seen: list[int] = []
    compiled = train(tiny_spec(**{"train.compile": True}), tmp_path / "compiled",
                     progress=False, on_step=lambda step, loss, model: seen.append(graphs()))
    # two context windows of 6 tokens, N = 2 passes each, then the prediction window:
    # every step runs the same paths, so graphs are made in the first step (and the
    # second, where a size seen to change is recompiled once as symbolic), never after
    assert seen[0] > 0 and seen[1] == seen[-1], seen
    for step, loss in eager.losses.items():
        assert compiled.losses[step] == pytest.approx(loss, rel=1e-4), step
    assert compiled.final is not None and eager.final is not None
    assert compiled.final.loss == pytest.approx(eager.final.loss, rel=1e-4)


def test_compiled_wake_step_decodes_like_eager_across_window_boundaries() -> None:
    spec = tiny_spec()
    sleeper = SleepingModel.from_spec(spec).eval()
    prompt = torch.randint(0, spec.model.vocab_size, (2, 14), generator=torch.Generator()
                           .manual_seed(0))
    tokens, logits, _ = sleeper.generate(prompt, 12, max_new_tokens=16)
    sleeper.model.compile_passes()
    torch._dynamo.reset()
    counters.clear()
    again, again_logits, _ = sleeper.generate(prompt, 12, max_new_tokens=16)
    assert torch.equal(again, tokens)
    torch.testing.assert_close(again_logits, logits, rtol=1e-4, atol=1e-5)
    made = graphs()
    sleeper.generate(prompt, 12, max_new_tokens=16)  # 16 tokens cross two wake windows
    assert made > 0 and graphs() == made


def test_a_failing_backend_falls_back_to_eager_with_one_warning() -> None:
    def broken_backend(graph: torch.fx.GraphModule, inputs: list) -> None:
        raise RuntimeError("no C++ compiler here")

    def scaled_sum(x: torch.Tensor) -> torch.Tensor:
        return (2 * x).sum()

    torch._dynamo.reset()
    fn = CompiledOrEager(scaled_sum, "a test function", backend=broken_backend)
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match="torch.compile of a test function failed"):
        assert fn(x).item() == 12.0
    assert fn.compiled is None and fn(x).item() == 12.0  # eager from now on, no new warning


def test_errors_of_the_function_itself_are_not_swallowed() -> None:
    def needs_matching_shapes(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b

    torch._dynamo.reset()
    fn = CompiledOrEager(needs_matching_shapes, "matmul")
    with pytest.raises(RuntimeError):
        fn(torch.ones(2, 3), torch.ones(2, 3))
