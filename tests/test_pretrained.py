"""Pretrained Llama weights: parity with transformers (Hugging Face directory and GGUF),
retrofit edits that keep the function at step 0, replaced attention, freezing, spec errors.

Every checkpoint is a tiny random Llama built and saved by transformers in a temp dir; the
GGUF is written from it with the gguf package, q/k rows permuted as llama.cpp's converter
does. Nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from archkit.pretrained.weights import permute_rope_rows, pretrained_parameters
from archkit.sleep import SleepingModel
from archkit.spec import Spec, SpecError, parse_spec
from archkit.trainer import train

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")

VOCAB = 97
SHAPES: dict[str, dict[str, Any]] = {
    "gqa_tied_llama3": {
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
        "rope_theta": 5e4, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    },
    "mha_untied": {"num_attention_heads": 4, "num_key_value_heads": 4,
                   "tie_word_embeddings": False},
    "gqa_tied": {"num_attention_heads": 4, "num_key_value_heads": 1,
                 "tie_word_embeddings": True, "rope_theta": 1e5},
}


def save_llama(directory: Path, shape: str, layers: int = 3) -> Any:
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        rms_norm_eps=1e-6, max_position_embeddings=256, **SHAPES[shape])
    model = transformers.LlamaForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


@pytest.fixture(scope="module")
def llamas(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Any]]:
    root = tmp_path_factory.mktemp("llamas")
    return {shape: (root / shape, save_llama(root / shape, shape)) for shape in SHAPES}


def write_gguf(path: Path, hf: Any) -> None:
    """The llama.cpp layout of ``hf``'s weights: GGUF names, q/k rows permuted."""
    config = hf.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    names = {"model.embed_tokens": "token_embd", "model.norm": "output_norm",
             "lm_head": "output", "input_layernorm": "attn_norm",
             "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    for name, tensor in hf.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        stem = name.removesuffix(".weight")
        if stem.startswith("model.layers."):
            _, _, index, part = stem.split(".", 3)
            gguf_name = f"blk.{index}.{names[part]}.weight"
        else:
            part, gguf_name = stem, f"{names[stem]}.weight"
        if part == "self_attn.q_proj":
            tensor = permute_rope_rows(tensor, config.num_attention_heads)
        elif part == "self_attn.k_proj":
            tensor = permute_rope_rows(tensor, config.num_key_value_heads)
        writer.add_tensor(gguf_name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def retrofit_spec(source: Path, **model: Any) -> Spec:
    return parse_spec({"name": "retrofit", "model": {"pretrained": {"path": str(source)},
                                                     **model},
                       "sleep": {"window": 64}})


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def tokens(batch: int = 3, length: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", ["gqa_tied_llama3", "mha_untied"])
def test_logits_equal_transformers_from_a_hugging_face_directory(
        llamas: dict[str, tuple[Path, Any]], shape: str) -> None:
    directory, hf = llamas[shape]
    sleeper = SleepingModel.from_spec(retrofit_spec(directory)).eval()
    batch = tokens()
    with torch.no_grad():
        expected = hf(batch).logits
        ours, _ = sleeper.model(batch)
        # through the sleep runtime: a window longer than the sequence reads it all awake
        slept = sleeper(batch, context_len=16).logits
    assert relative_error(ours, expected) < 1e-5
    assert relative_error(slept, expected[:, 16:]) < 1e-5


def test_logits_equal_transformers_from_gguf(llamas: dict[str, tuple[Path, Any]],
                                             tmp_path: Path) -> None:
    _, hf = llamas["gqa_tied"]
    write_gguf(tmp_path / "tiny.gguf", hf)
    spec = retrofit_spec(tmp_path / "tiny.gguf")
    assert spec.model.blocks["attention"]["n_kv_heads"] == 1 and spec.model.tie_embeddings
    sleeper = SleepingModel.from_spec(spec).eval()
    batch = tokens()
    with torch.no_grad():
        assert relative_error(sleeper.model(batch)[0], hf(batch).logits) < 1e-5


def test_greedy_generation_matches_transformers(llamas: dict[str, tuple[Path, Any]]) -> None:
    directory, hf = llamas["gqa_tied_llama3"]
    sleeper = SleepingModel.from_spec(retrofit_spec(directory)).eval()
    for seed in range(3):
        prompt = tokens(1, 12, seed)
        ours, _, _ = sleeper.generate(prompt, context_len=4, max_new_tokens=10)
        theirs = hf.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert ours.tolist() == theirs[:, 12:].tolist()


INSERTS = [
    {"after": 0, "block": "gated_delta", "mlp": True},
    {"before": 2, "block": "hebbian"},
    {"after": 2, "block": "mamba2", "mlp": True},
    {"after": 2, "block": "jet"},
]


def test_inserted_layers_leave_the_function_unchanged_at_step_0(
        llamas: dict[str, tuple[Path, Any]]) -> None:
    directory, hf = llamas["gqa_tied_llama3"]
    spec = retrofit_spec(directory, **{"pretrained": {"path": str(directory),
                                                     "insert": INSERTS}})
    assert [layer.block for layer in spec.model.resolved_layers] == [
        "attention", "gated_delta", "attention", "hebbian", "attention", "mamba2", "jet"]
    sleeper = SleepingModel.from_spec(spec).eval()
    batch = tokens()
    with torch.no_grad():
        assert torch.allclose(sleeper.model(batch)[0], hf(batch).logits, rtol=1e-5, atol=1e-6)
    # the new layers learn: their zeroed output projections get gradient
    sleeper.train()
    answers = torch.zeros(3, 40, dtype=torch.bool)
    answers[:, 20:] = True
    out = sleeper(batch, context_len=16, loss_mask=answers)
    assert out.loss is not None
    out.loss.backward()
    assert sleeper.model.layers[1].mixer.o_proj.weight.grad.abs().sum() > 0


def test_looping_middle_layers_of_a_pretrained_model_sleeps(
        llamas: dict[str, tuple[Path, Any]]) -> None:
    directory, _ = llamas["gqa_tied_llama3"]
    raw = {"name": "loop", "model": {"pretrained": {"path": str(directory), "insert": INSERTS}},
           "sleep": {"window": 8, "passes": 3, "layers": [1, 3]}}
    sleeper = SleepingModel.from_spec(parse_spec(raw)).eval()
    with torch.no_grad():
        out = sleeper(tokens(), context_len=32)
    assert out.report.passes == [3, 3, 3, 3] and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("block", ["gated_delta", "jet"])
def test_replaced_attention_starts_from_its_projections(
        llamas: dict[str, tuple[Path, Any]], block: str) -> None:
    directory, hf = llamas["gqa_tied_llama3"]
    spec = retrofit_spec(directory, **{"pretrained": {
        "path": str(directory), "replace": [{"layer": 1, "block": block}]}})
    sleeper = SleepingModel.from_spec(spec)
    layer = sleeper.model.layers[1]
    attention = hf.model.layers[1].self_attn
    q, k, v = layer.mixer.qkv_proj.weight.detach().split([64, 64, 64])
    assert torch.equal(q, attention.q_proj.weight)
    # two query heads share each KV head: the block's heads 0, 1 take KV head 0
    assert torch.equal(k[:32], attention.k_proj.weight[:16].repeat(2, 1))
    assert torch.equal(v[32:], attention.v_proj.weight[16:].repeat(2, 1))
    assert torch.equal(layer.mixer.o_proj.weight, attention.o_proj.weight)
    assert torch.equal(layer.mlp.down.weight, hf.model.layers[1].mlp.down_proj.weight)
    # its convolution starts as the identity: a value passes through unmixed
    x = torch.randn(1, 5, 64)
    with torch.no_grad():
        v = layer.mixer.qkv_proj(x)[..., 128:]
        if block == "jet":
            mixed, _ = layer.mixer.conv(x, v, layer.mixer.init_state(1).conv_tail)
        else:
            mixed = layer.mixer.conv(layer.mixer.qkv_proj(x), layer.mixer.init_state(1)
                                     .conv_tail)[0][..., 128:]
    assert torch.allclose(mixed.flatten(2), torch.nn.functional.silu(v), atol=1e-6)


@pytest.mark.parametrize("freeze", [{"pretrained": True}, {"embeddings": True, "layers": [2]}])
def test_frozen_parameters_do_not_move_and_the_rest_do(
        llamas: dict[str, tuple[Path, Any]], tmp_path: Path, freeze: dict[str, Any]) -> None:
    from archkit.checkpoint import load_run
    from archkit.evaluation import evaluate_run

    directory = tmp_path / "llama"
    shutil.copytree(llamas["mha_untied"][0], directory)
    raw = {
        "name": "frozen", "seed": 0,
        "model": {"pretrained": {"path": str(directory), "insert": INSERTS[:1]}},
        "sleep": {"window": 12, "passes": 2},
        "task": {"name": "rule110", "width": 6, "states": 2},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2,
                  "eval_size": 8, "log_every": 1, "optimizer": "adamw", "lr": 1e-2,
                  "baseline_examples": 8, "freeze": freeze},
    }
    spec = parse_spec(raw)
    before = SleepingModel.from_spec(spec).model
    train(spec, tmp_path / "run", progress=False)
    after = dict(load_run(tmp_path / "run").model.model.named_parameters())
    if freeze.get("pretrained"):
        frozen = pretrained_parameters(before, spec.model)
        assert "layers.1.mixer.o_proj.weight" not in frozen  # the inserted layer learns
    else:
        frozen = {"embedding.weight", "head.weight"} | {
            name for name, _ in before.named_parameters() if name.startswith("layers.2.")}
    for name, value in before.named_parameters():
        moved = not torch.equal(value, after[name])
        assert moved == (name not in frozen), name
    # the run is its own: with the pretrained files gone it evaluates and resumes
    shutil.rmtree(directory)
    final = json.loads((tmp_path / "run/final.json").read_text())
    assert evaluate_run(load_run(tmp_path / "run")).metrics()["exact"] == final["exact"]
    with pytest.raises(SpecError, match=r"model\.pretrained\.path"):  # a new run needs them
        parse_spec({**raw, "train": {**raw["train"], "steps": 3}})
    stored = load_run(tmp_path / "run").spec.model_dump(mode="json")
    stored["train"]["steps"] = 3
    train(parse_spec(stored), tmp_path / "run", resume=True, progress=False)


def test_spec_errors_name_the_field(llamas: dict[str, tuple[Path, Any]], tmp_path: Path
                                    ) -> None:
    directory, _ = llamas["gqa_tied"]

    def problem(model: dict[str, Any]) -> str:
        with pytest.raises(SpecError) as err:
            parse_spec({"name": "bad", "model": model})
        return err.value.path

    source = {"path": str(directory)}
    assert problem({"pretrained": source, "d_model": 32}) == "model.d_model"
    assert problem({"pretrained": {"path": str(tmp_path / "nothing")}}) == "model.pretrained.path"
    assert problem({"pretrained": {"package": "no-such-archkit-package"}}) == \
        "model.pretrained.package"
    assert problem({"pretrained": {**source, "insert": [{"after": 3, "block": "jet"}]}}) == \
        "model.pretrained.insert[0].after"
    assert problem({"pretrained": {**source, "insert": [{"block": "hebbian"}]}}) == \
        "model.pretrained.insert[0]"
    assert problem({"pretrained": {**source, "pattern": "A"}}) == "model.pretrained.pattern"
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text('{"model_type": "llama", "hidden_size": ')
    assert problem({"pretrained": {"path": str(corrupt)}}) == "model.pretrained.path"
    (corrupt / "config.json").write_text('{"model_type": "llama"}')  # keys missing
    assert problem({"pretrained": {"path": str(corrupt)}}) == "model.pretrained.path"
    # a saved spec names every field the checkpoint fixed, and loads again
    spec = parse_spec({"name": "ok", "model": {"pretrained": {**source, "insert": INSERTS}}})
    again = parse_spec(spec.model_dump(mode="json"))
    assert again.model.resolved_layers == spec.model.resolved_layers


def test_transformers_imports_from_the_repository_root() -> None:
    """``python -m`` from a checkout puts its root on sys.path: no folder there may shadow
    a module transformers looks for (it probes for a ``kernels`` package)."""
    root = Path(__file__).resolve().parents[1]
    probe = "import transformers; transformers.LlamaForCausalLM; print('ok')"
    result = subprocess.run([sys.executable, "-c", probe], cwd=root, capture_output=True,
                            text=True)
    assert result.stdout.strip() == "ok", result.stderr[-2000:]


def save_story_tokenizer(directory: Path) -> Any:
    """A byte-level BPE tokenizer trained here on story problems, digits split as in
    SmolLM2's, saved the way transformers saves any tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from archkit.tasks import get_task

    stories = get_task("gsm_infinite", rendering="story").sample(64, seed=5).examples
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=360, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(
        [f"{s.question} {s.context} Answer: {s.answer}" for s in stories], trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer,
                                                eos_token="<eos>", pad_token="<pad>")
    fast.save_pretrained(directory)
    return fast


def test_text_task_round_trip_with_the_model_tokenizer(tmp_path: Path) -> None:
    """Tokenise story problems with the checkpoint's tokenizer, train 2 steps, decode,
    score: an example is exact exactly when its decoded answer is the integer."""
    from archkit.checkpoint import load_run
    from archkit.evaluation import evaluate

    directory = tmp_path / "llama"
    tokenizer = save_story_tokenizer(directory)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    raw = {
        "name": "text", "seed": 0,
        "model": {"pretrained": {"path": str(directory),
                                 "insert": [{"after": 0, "block": "jet"}]}},
        "sleep": {"window": 32, "passes": 2},
        "task": {"name": "gsm_infinite", "rendering": "story", "tokenizer": "model",
                 "ops": [1, 2], "context_tokens": [70, 90], "names": 40},
        "train": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 2,
                  "eval_size": 8, "log_every": 1, "optimizer": "adamw",
                  "baseline_examples": 16},
    }
    spec = parse_spec(raw)
    assert spec.task.config.tokenizer.path == str(directory)
    task = spec.task.build()
    batch = task.eval_batch(6, seed=3)
    for row, example in zip(batch.tokens, batch.examples, strict=True):
        context = task.decode(row[: task.context_len][row[: task.context_len] != task.pad_id])
        assert context.strip().startswith(example.question)
    # the answers decode to the integer; a wrong digit makes the example wrong
    for row, mask, example in zip(batch.tokens, batch.loss_mask, batch.examples, strict=True):
        assert int(task.decode(row[mask][:-1])) == example.answer
        assert row[mask][-1] == tokenizer.eos_token_id
    right = task.score(batch.tokens, batch)
    assert right.overall.exact == 1.0
    wrong = batch.tokens.clone()
    first_answer = batch.loss_mask[0].nonzero()[0, 0]
    wrong[0, first_answer] = (wrong[0, first_answer] + 1) % len(tokenizer)
    assert task.score(wrong, batch).overall.exact == pytest.approx(5 / 6)
    # the number may end with any token but a digit in place of the end-of-sequence
    last = batch.loss_mask[1].nonzero()[-1, 0]
    ended, extended = batch.tokens.clone(), batch.tokens.clone()
    ended[1, last] = tokenizer.convert_tokens_to_ids(".")
    extended[1, last] = tokenizer.convert_tokens_to_ids("7")
    assert task.score(ended, batch).overall.exact == 1.0
    assert task.score(extended, batch).overall.exact == pytest.approx(5 / 6)

    train(spec, tmp_path / "run", progress=False)
    run = load_run(tmp_path / "run")
    with torch.no_grad():
        out = run.model(batch.tokens, batch.context_len)
    predictions = torch.full_like(batch.tokens, -1)
    predictions[:, batch.context_len + 1:] = out.logits[:, :-1].argmax(-1)
    decoded = [task.decode(p[m]) for p, m in zip(predictions, batch.loss_mask, strict=True)]
    integer_match = [d == f" {e.answer}{tokenizer.eos_token}" or
                     d == f"{e.answer}{tokenizer.eos_token}"
                     for d, e in zip(decoded, batch.examples, strict=True)]
    scored = evaluate(run.model, task, batch, batch_size=3).score.overall.exact
    assert scored == pytest.approx(sum(integer_match) / len(batch))


def test_cli_zero_shot_eval_and_missing_weights(llamas: dict[str, tuple[Path, Any]],
                                                tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """`archkit eval SPEC` scores the pretrained model untrained; a directory with a
    config.json but no weights is one line and exit 2 when training starts."""
    import yaml

    from archkit.cli import main

    directory, _ = llamas["gqa_tied"]
    spec = {"name": "zero_shot", "model": {"pretrained": {"path": str(directory)}},
            "sleep": {"window": 64}, "task": {"name": "rule110", "width": 6, "states": 2},
            "train": {"eval_size": 16, "baseline_examples": 16, "steps": 2}}
    path = tmp_path / "zero_shot.yaml"
    path.write_text(yaml.safe_dump(spec))
    main(["eval", str(path), "--json"])
    scored = json.loads(capsys.readouterr().out)
    assert 0 <= scored["exact"] <= 1 and "baseline" in scored

    empty = tmp_path / "no_weights"
    empty.mkdir()
    shutil.copy(directory / "config.json", empty / "config.json")
    spec["model"]["pretrained"]["path"] = str(empty)
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(SystemExit) as exit_code:
        main(["train", str(path), "--runs", str(tmp_path / "runs"), "--no-progress"])
    assert exit_code.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "no .safetensors weights" in error[0]


def test_a_relative_checkpoint_path_is_read_from_the_spec_file(
        llamas: dict[str, tuple[Path, Any]], tmp_path: Path) -> None:
    """Like `extends`, a relative `model.pretrained.path` means the same folder from
    wherever the spec is loaded (here through an extends chain from another folder)."""
    import yaml

    from archkit.spec import load_spec

    shutil.copytree(llamas["gqa_tied"][0], tmp_path / "weights/llama")
    (tmp_path / "specs/sub").mkdir(parents=True)
    (tmp_path / "specs/base.yaml").write_text(yaml.safe_dump(
        {"name": "base", "model": {"pretrained": {"path": "../weights/llama"}},
         "sleep": {"window": 8}}))
    (tmp_path / "specs/sub/child.yaml").write_text("extends: ../base.yaml\nname: child\n")
    spec = load_spec(tmp_path / "specs/sub/child.yaml")
    assert spec.model.pretrained.path == str((tmp_path / "weights/llama").resolve())


def test_freezing_every_parameter_is_refused(llamas: dict[str, tuple[Path, Any]],
                                            tmp_path: Path) -> None:
    raw = {"name": "all_frozen", "model": {"pretrained": {"path": str(llamas["gqa_tied"][0])}},
           "sleep": {"window": 12}, "task": {"name": "rule110", "width": 6, "states": 2},
           "train": {"steps": 2, "batch_size": 4, "freeze": {"pretrained": True}}}
    with pytest.raises(SpecError) as err:
        train(parse_spec(raw), tmp_path / "run", progress=False)
    assert err.value.path == "train.freeze"
