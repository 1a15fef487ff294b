"""GGUF import beyond Llama: a tiny Qwen2 written with the `gguf` package, converted by prepare_gguf, equals its
source weights exactly (F32) and keeps its tokenizer."""

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from petald.errors import CheckpointError
from petald.models.checkpoints import GGUF_ARCHITECTURES, MARKER_FILE, make_tiny_tokenizer, prepare_gguf

TEXT = "The capital of France is Paris. A swarm of small machines can serve a large language model together."


@pytest.fixture
def petal_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("PETAL_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def tiny_qwen2() -> tuple[Qwen2ForCausalLM, object]:
    """A random Qwen2 (biased q/k/v, untied head) of 2 blocks, with the project's tiny tokenizer."""
    tokenizer = make_tiny_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(config).eval()
        for param in model.parameters():  # the biases start at 0 and norms at 1: give every tensor its own values
            param.data.normal_(0, 0.2)
    return model, tokenizer


def write_qwen2_gguf(path: Path, model: Qwen2ForCausalLM, tokenizer) -> Path:
    """The model as llama.cpp's converter lays out a Qwen2: its metadata, its tokenizer and F32 tensors."""
    config = model.config
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_name("tiny-qwen2")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)

    vocab = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    tokens = sorted(tokenizer.get_vocab(), key=tokenizer.get_vocab().get)
    special = set(tokenizer.all_special_tokens)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    types = [gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens]
    writer.add_token_types(types)
    writer.add_token_merges([" ".join(merge) if isinstance(merge, list) else merge for merge in vocab["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, name
        writer.add_tensor(gguf_name, tensor.numpy().astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_qwen2_gguf_round_trip_is_exact(tmp_path: Path, petal_home: Path) -> None:
    source, tokenizer = tiny_qwen2()
    gguf_path = write_qwen2_gguf(tmp_path / "tiny-qwen2.gguf", source, tokenizer)

    target = prepare_gguf(gguf_path, "tiny-qwen2", progress=False)

    assert json.loads((target / MARKER_FILE).read_text())["architecture"] == "qwen2"
    config = AutoConfig.from_pretrained(target)
    assert config.model_type == "qwen2" and config.num_hidden_layers == 2 and not config.tie_word_embeddings
    saved = load_file(target / "model.safetensors")
    expected = source.state_dict()
    assert set(saved) == set(expected)
    for name, tensor in expected.items():
        assert saved[name].dtype == torch.float32, name
        assert torch.equal(saved[name], tensor), name  # F32 in, F32 out: bit for bit
    converted = AutoTokenizer.from_pretrained(target)
    assert converted(TEXT).input_ids == tokenizer(TEXT).input_ids
    assert converted.eos_token == tokenizer.eos_token


def test_an_unconvertible_gguf_architecture_is_named_with_the_supported_ones(tmp_path: Path, petal_home: Path):
    writer = gguf.GGUFWriter(tmp_path / "mamba.gguf", "mamba")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="'mamba'.*only: llama, mistral, qwen2, qwen2moe, .*gemma3") as error:
        prepare_gguf(tmp_path / "mamba.gguf", "mamba", progress=False)
    assert all(name in str(error.value) for name in GGUF_ARCHITECTURES)
    assert list((petal_home / "models").iterdir()) == []
