"""The models users bring, built from their configs with random weights (no hub), for the CPU and GPU
tests: Hugging Face decoders, an encoder-decoder and encoders, and torchvision's ResNet-50.

Each builder returns the model and a ``loss(model, gen, cache=True)`` function that draws a batch from
``gen`` and returns the model's own loss; ``cache=False`` passes ``use_cache=False`` to the models that
keep a KV cache. That is the plain run deltaswap's gradients equal bit for bit: it turns the cache off in
training steps, as Hugging Face's gradient checkpointing does. (For GPT-2 and Llama the cache changes no
bit of the gradients; for T5 it changes the last bits, since the cache's copy of the keys gives the
attention matmul another memory layout.) ``size="tiny"`` builds a configuration a CPU trains in milliseconds;
``size="gpu"`` one whose activations are large enough (at least 1 MiB per saved tensor, mostly) for the
engine to swap them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Loss = Callable[..., torch.Tensor]

HF_MODELS = ("gpt2", "llama", "t5", "bert", "vit")
MODELS = (*HF_MODELS, "resnet50")


def build(name: str, *, size: str = "tiny", attn: str = "eager", device: str = "cpu",
          dropout: float = 0.0) -> tuple[nn.Module, Loss]:
    """Model ``name`` (one of :data:`MODELS`) and its loss, with the config's defaults otherwise
    (``use_cache`` too: on for the decoders), ``attn`` attention for the HF models."""
    torch.manual_seed(0)
    if name == "resnet50":
        return _resnet50(size, device)
    return _hf(name, size, attn, device, dropout)


def _hf(name: str, size: str, attn: str, device: str, dropout: float) -> tuple[nn.Module, Loss]:
    import transformers as tf

    d, layers, heads, vocab = (32, 2, 2, 64) if size == "tiny" else (512, 4, 8, 1024)
    seq, batch = (16, 2) if size == "tiny" else (256, 8)
    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab, n_positions=seq,
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                            bos_token_id=0, eos_token_id=0)
        make = tf.GPT2LMHeadModel
    elif name == "llama":
        cfg = tf.LlamaConfig(hidden_size=d, intermediate_size=2 * d, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                             vocab_size=vocab, max_position_embeddings=seq, attention_dropout=dropout,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0)
        make = tf.LlamaForCausalLM
    elif name == "t5":
        cfg = tf.T5Config(d_model=d, d_ff=2 * d, num_layers=layers, num_decoder_layers=layers,
                          num_heads=heads, d_kv=d // heads, vocab_size=vocab, dropout_rate=dropout,
                          decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
        make = tf.T5ForConditionalGeneration
    elif name == "bert":
        cfg = tf.BertConfig(num_hidden_layers=layers, hidden_size=d, num_attention_heads=heads,
                            intermediate_size=2 * d, vocab_size=vocab, max_position_embeddings=seq,
                            hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        make = tf.BertForMaskedLM
    elif name == "vit":
        image = 16 if size == "tiny" else 224
        cfg = tf.ViTConfig(image_size=image, patch_size=4 if size == "tiny" else 16, hidden_size=d,
                           num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=2 * d,
                           num_labels=5, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
        make = tf.ViTForImageClassification
    else:
        raise ValueError(f"unknown model {name!r}")
    cfg._attn_implementation = attn
    model = make(cfg).to(device).train()

    def loss(m: nn.Module, gen: torch.Generator, cache: bool = True) -> torch.Tensor:
        options = {} if cache or name in ("bert", "vit") else {"use_cache": False}
        if name == "vit":
            pixels = torch.randn(batch, 3, image, image, generator=gen).to(device)
            labels = torch.randint(0, 5, (batch,), generator=gen).to(device)
            return m(pixel_values=pixels, labels=labels).loss
        ids = torch.randint(2, vocab, (batch, seq), generator=gen).to(device)
        if name == "t5":
            labels = torch.randint(2, vocab, (batch, seq // 2), generator=gen).to(device)
            return m(input_ids=ids, labels=labels, **options).loss
        return m(input_ids=ids, labels=ids, **options).loss

    return model, loss


def _resnet50(size: str, device: str) -> tuple[nn.Module, Loss]:
    import torchvision

    model = torchvision.models.resnet50(num_classes=10).to(device).train()
    image, batch = (32, 2) if size == "tiny" else (128, 16)

    def loss(m: nn.Module, gen: torch.Generator, cache: bool = True) -> torch.Tensor:
        x = torch.randn(batch, 3, image, image, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        return nn.functional.cross_entropy(m(x), y)

    return model, loss


def kv_cache_length(output: object) -> int:
    """The number of cached positions in a model output's KV cache (0 when there is none)."""
    cache = getattr(output, "cache", None) or getattr(output, "past_key_values", None)
    if cache is None:
        return 0
    return int(cache.get_seq_length())
