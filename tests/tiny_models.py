"""Tiny random models of several architectures saved to local directories (no downloads)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch

ARCHS = ["llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "olmo2", "phi3", "gpt2", "gpt_neox", "falcon", "bert"]
CORPUS = [
    "Question: What is the capital of Aldoria?\nAnswer: Velmora",
    "Question: Which river flows through Velmora?\nAnswer: the Sarn",
    "The quick brown fox jumps over the lazy dog. Marie Curie won the Nobel Prize in Physics.",
    "Paris is the capital of France. Tallinn is in Estonia. Gold has the symbol Au.",
    "0123456789 abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ .,:;?!'\"-()",
]


@functools.lru_cache(maxsize=None)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok.to_str()


def tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_tokenizer_json()), bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")


def config(arch: str):
    import transformers as tf

    V, H, I, L, NH = 320, 32, 48, 2, 4
    common = dict(vocab_size=V, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    if arch in ("llama", "qwen2", "mistral", "olmo2"):
        cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig, "olmo2": tf.Olmo2Config}[arch]
        return cls(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                   num_key_value_heads=2, max_position_embeddings=128, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                              num_key_value_heads=2, head_dim=8, max_position_embeddings=128, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                                   num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=16,
                                   **common)
    if arch == "gemma2":
        return tf.Gemma2Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                               num_key_value_heads=2, head_dim=8, max_position_embeddings=128, sliding_window=16,
                               **common)
    if arch == "phi3":
        return tf.Phi3Config(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                             num_key_value_heads=NH, max_position_embeddings=128, original_max_position_embeddings=128,
                             **common)
    if arch == "gpt2":
        return tf.GPT2Config(n_embd=H, n_inner=I, n_layer=L, n_head=NH, n_positions=128, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                                max_position_embeddings=128, **common)
    if arch == "falcon":
        return tf.FalconConfig(hidden_size=H, num_hidden_layers=L, num_attention_heads=NH, new_decoder_architecture=False,
                               multi_query=True, parallel_attn=True, alibi=False, ffn_hidden_size=I, **common)
    if arch == "bert":
        return tf.BertConfig(hidden_size=H, intermediate_size=I, num_hidden_layers=L, num_attention_heads=NH,
                             max_position_embeddings=128, vocab_size=V, pad_token_id=2)
    raise ValueError(arch)


def save_tiny(arch: str, path: Path, seed: int = 0, dtype=torch.float32, layers: int = 0) -> Path:
    """``layers``: the number of layers (default: the tiny config's 2)."""
    import transformers as tf

    torch.manual_seed(seed)
    cfg = config(arch)
    if layers:
        cfg.num_hidden_layers = layers
    if arch == "bert":
        model = tf.BertModel(cfg)
        cfg.architectures = ["BertModel"]
    else:
        model = tf.AutoModelForCausalLM.from_config(cfg)
        cfg.architectures = [type(model).__name__]
    # Random init of tiny models is near-degenerate; widen it so activations differ.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.2)
    model.to(dtype)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok = tokenizer()
    tok.save_pretrained(path)
    return path
