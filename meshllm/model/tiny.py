"""Tiny random models, built in a second or two: no hub, no download.

`build_tiny_model(folder, arch)` writes a Hugging Face folder (safetensors, config, tokenizer
with a ChatML chat template) of a random Llama, Qwen2 or Mistral model with 6 small layers.
The tests build them (tests/tinymodel.py adds the transformers reference), and so does
scripts/check_cuda.py; `PROMPTS` are the conversations both ask them.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a mesh of laptops and phones runs one language model together",
    "hello world, how are you today? I am fine, thank you.",
    "layers are split into spans and activations stream between devices",
    "What is the capital of France? Paris is the capital of France.",
    "numbers 0 1 2 3 4 5 6 7 8 9 and symbols + - * / = ( ) [ ] { }",
    "Écrire en français, 日本語のテキスト, emoji 🙂 and more",
]

TINY_MAX_POSITIONS = 256


def build_tokenizer(folder: Path):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(folder)
    return fast


def build_tiny_model(folder: Path, arch: str = "llama", *, num_layers: int = 6, seed: int = 0) -> Path:
    """Write a tiny random `arch` model ("llama", "qwen2" or "mistral") into `folder`."""
    from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(folder)
    common = dict(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_MAX_POSITIONS,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        initializer_range=0.2,  # large weights: varied greedy answers, not one repeated token
    )
    if arch == "llama":
        config = LlamaConfig(**common, tie_word_embeddings=True)
    elif arch == "qwen2":
        config = Qwen2Config(**common, tie_word_embeddings=False)
    elif arch == "mistral":
        config = MistralConfig(**common, sliding_window=24, tie_word_embeddings=False)
    else:
        raise ValueError(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(folder)
    return folder


PROMPTS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about laptops."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Count from 1 to 10."}],
    [{"role": "user", "content": "Explain what a KV cache is in one sentence."}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Tell me a fact about the moon."}],
    [{"role": "user", "content": "Traduis en français : the cat sleeps on the sofa. 🙂"}],
    [{"role": "user", "content": "def add(a, b):\n    return a + b\n# what does this do?"}],
]
