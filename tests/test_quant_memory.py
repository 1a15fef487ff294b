"""Quantization saves memory: what a quantized block costs (computed and measured), and a span's resident memory
with nf4 against fp32, read from /proc in fresh processes (BENCHMARKS.md has the real model's figures)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from petald.errors import PetalError
from petald.models.loading import load_config
from petald.serving.span import Span, block_weight_bytes, quantized_linear_bytes, weight_bytes

ROOT = Path(__file__).resolve().parent.parent


def test_quantized_linear_bytes_follow_the_storage_formats() -> None:
    assert quantized_linear_bytes(128, 64, "none") == 4 * 128 * 64
    assert quantized_linear_bytes(128, 64, "int8") == 128 * 64 + 4 * 128  # a byte a value, an fp32 scale a row
    # nf4: 4096 half bytes, 128 blocks of 64 with a uint8 absmax each, one fp32 absmax for them, the code tables
    assert quantized_linear_bytes(128, 64, "nf4") == 4096 + 128 + 4 + 4 * (16 + 256 + 1)
    with pytest.raises(PetalError, match="unknown quantization 'fp8'"):
        quantized_linear_bytes(128, 64, "fp8")


def test_block_weight_bytes_of_a_quantized_span_are_what_it_holds(tiny_llama: Path) -> None:
    config = load_config(tiny_llama)
    # the tiny Llama's block: 7 Linears of 36864 values in all (q, o 64x64; k, v 32x64; gate, up, down 64x128),
    # two fp32 norms of 64
    linears = [(64, 64), (32, 64), (32, 64), (64, 64), (128, 64), (128, 64), (64, 128)]
    norms = 4 * 2 * 64
    assert block_weight_bytes(config, "none") == 4 * 36864 + norms
    assert block_weight_bytes(config, "int8") == 36864 + 4 * sum(out for out, _ in linears) + norms
    assert block_weight_bytes(config, "nf4") == sum(quantized_linear_bytes(o, i, "nf4") for o, i in linears) + norms
    assert block_weight_bytes(config, "nf4") < block_weight_bytes(config, "int8") < block_weight_bytes(config, "none")
    for quant in ("none", "int8", "nf4"):
        span = Span.load(tiny_llama, 1, 4, quant)
        buffers = sum(b.numel() * b.element_size() for b in span.module.buffers())  # the rotary tables: span-wide
        assert weight_bytes(span.module) - buffers == 3 * block_weight_bytes(config, quant), quant
        span.forward(torch.randn(1, 5, config.hidden_size))  # int8 layers move their scales on their first pass
        assert weight_bytes(span.module) - buffers == 3 * block_weight_bytes(config, quant), quant


NO_MAPPING = """
import sys
from pathlib import Path
import bitsandbytes as bnb, torch
from petald.serving.span import Span

span = Span.load(Path(sys.argv[1]), 0, 6, "nf4")
assert not any(type(m) is torch.nn.Linear for m in span.module.modules())
assert all(p.dtype == torch.uint8 for m in span.module.modules() if isinstance(m, bnb.nn.LinearNF4) for p in [m.weight])
mapped = [line for line in Path("/proc/self/maps").read_text().splitlines() if sys.argv[1] in line]
assert not mapped, mapped
"""


def test_quantized_span_keeps_no_full_precision_weight(tiny_llama: Path) -> None:
    # in a fresh process: other tests of this one may hold spans that map the same checkpoint. Nothing of the
    # nf4 span refers to the checkpoint's memory mapping: the file is no longer mapped into the process.
    done = subprocess.run(
        [sys.executable, "-c", NO_MAPPING, str(tiny_llama)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]


MEASURE = """
import json, sys, torch
from pathlib import Path
import bitsandbytes  # imported by both, so that the difference is the span's
from petald.models.loading import release_free_memory
from petald.serving.span import Span

def status():
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

torch.set_num_threads(1)
before = status()
span = Span.load(Path(sys.argv[1]), 0, 8, sys.argv[2])
session = span.new_session(1, 16)
span.step(session, torch.randn(1, 8, span.hidden_size))
span.step(session, torch.randn(1, 1, span.hidden_size))
del session
release_free_memory()  # as a server does once no session is open (SpanServer._release_memory_if_idle)
print(json.dumps({"before": before, "after": status()}))
"""


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory) -> Path:
    """A random Llama whose 8 blocks (135 MB in fp32) outweigh what a step allocates beside them."""
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        max_position_embeddings=64,
    )
    out = tmp_path_factory.mktemp("wide-llama")
    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = LlamaForCausalLM(config)
    model.to_empty(device="cpu")
    for param in model.parameters():
        param.data.normal_(0, 0.02)
    model.save_pretrained(out)
    return out


def resident(model_dir: Path, quant: str) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(model_dir), quant],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_nf4_span_is_resident_in_far_less_memory_than_fp32(wide_llama: Path) -> None:
    fp32, nf4 = resident(wide_llama, "none"), resident(wide_llama, "nf4")
    grown = {name: m["after"]["VmRSS"] - m["before"]["VmRSS"] for name, m in (("fp32", fp32), ("nf4", nf4))}
    # fp32: the 135 MB of weights, paged in from the file; nf4: their 18 MB (malloc's kept temporaries of the steps
    # handed back, as an idle server does); before the load was made block by block, nf4 kept the file's pages as
    # well (≥ 135 MB)
    assert grown["fp32"] > 120 * 2**20, grown
    assert grown["nf4"] < 0.5 * grown["fp32"], grown
    assert nf4["after"]["RssFile"] - nf4["before"]["RssFile"] < 20 * 2**20, nf4  # no file pages kept
    assert nf4["after"]["VmRSS"] < fp32["after"]["VmRSS"] - 60 * 2**20, (nf4, fp32)
