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
def tiny_folder(tmp_path_factory):
    """A tiny random Llama saved with a word-level tokenizer (``w1`` ... ``w127``): a local model folder that loads
    offline in about a second (Ray workers, model-path validation)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-model")
    tiny_llama().save_pretrained(folder)
    vocab = {"[UNK]": 0, **{f"w{i}": i for i in range(1, 128)}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]").save_pretrained(folder)
    return folder


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


@pytest.fixture(scope="module")
def tiny_with_tokenizer(tokenizer):
    """``(model, tokenizer)``: a tiny random two-layer Llama whose vocabulary is the real SmolLM2 tokenizer's (what
    ``load_model`` returns, for the command tests)."""
    return tiny_llama(vocab_size=len(tokenizer), num_hidden_layers=2), tokenizer
