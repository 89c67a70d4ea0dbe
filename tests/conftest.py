import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

torch.set_num_threads(1)


def tiny_llama(seed: int = 0, **overrides) -> LlamaForCausalLM:
    """Random tiny Llama with GQA (4 query heads, 2 KV heads) for fast unit tests."""
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, attn_implementation="sdpa",
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_llama()


@pytest.fixture(scope="session")
def smollm2():
    from caote import load_model

    return load_model()


@pytest.fixture(scope="session")
def tokenizer():
    """The real SmolLM2 tokenizer (offline; converted from the packaged GGUF on first use)."""
    from caote import load_tokenizer

    return load_tokenizer()
