"""Tiny randomly initialised causal LMs, built from configs, for tests that must not
download anything: one per supported architecture, and a Llama of any shape."""

import torch
import transformers as T

VOCAB = 128
_SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}


def tiny_config(name: str, layers: int):
    if name == "llama":
        return T.LlamaConfig(**_SMALL, num_hidden_layers=layers)
    if name == "mistral":
        return T.MistralConfig(**_SMALL, num_hidden_layers=layers, sliding_window=8)
    if name == "qwen2":
        return T.Qwen2Config(**_SMALL, num_hidden_layers=layers)
    if name == "qwen3":
        return T.Qwen3Config(**_SMALL, num_hidden_layers=layers, head_dim=8)
    if name == "gemma":
        return T.GemmaConfig(**_SMALL, num_hidden_layers=layers, head_dim=8)
    if name == "gemma2":
        return T.Gemma2Config(**_SMALL, num_hidden_layers=layers, head_dim=8, sliding_window=4)
    if name == "gemma3":
        # the default layer_types: five sliding-window layers, then one global
        return T.Gemma3TextConfig(**_SMALL, num_hidden_layers=layers, head_dim=8, sliding_window=4)
    if name == "phi3":
        return T.Phi3Config(**_SMALL, num_hidden_layers=layers, pad_token_id=0, bos_token_id=1,
                            eos_token_id=2)
    if name == "gpt2":
        return T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4, n_positions=256,
                            bos_token_id=1, eos_token_id=2)
    if name == "opt":
        return T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=layers,
                           num_attention_heads=4, max_position_embeddings=256,
                           word_embed_proj_dim=32)
    if name == "gpt_neox":
        return T.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                               num_hidden_layers=layers, num_attention_heads=4,
                               max_position_embeddings=256)
    if name == "falcon":  # Falcon's blocks return a tuple (hidden, attention weights)
        return T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                              num_attention_heads=4)
    if name == "falcon_alibi":
        return T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                              num_attention_heads=4, alibi=True)
    raise KeyError(name)


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "gpt2",
                 "opt", "gpt_neox", "falcon", "falcon_alibi"]

def tiny_model(name: str = "llama", layers: int = 4, seed: int = 0):
    """A randomly initialised causal LM of architecture ``name``, in eval mode."""
    torch.manual_seed(seed)
    return T.AutoModelForCausalLM.from_config(tiny_config(name, layers)).eval()


def tiny_llama(*, vocab_size=VOCAB, hidden=32, intermediate=64, layers=4, max_positions=256,
               tie=False, seed=0, **config):
    """A random LlamaForCausalLM of the given shape, in eval mode (4 heads, 2 KV heads)."""
    torch.manual_seed(seed)
    cfg = T.LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate,
                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                        max_position_embeddings=max_positions, tie_word_embeddings=tie, **config)
    return T.LlamaForCausalLM(cfg).eval()


def byte_tokenizer():
    """A GPT-2-style byte-level tokenizer with no merges: one token per byte, plus EOS
    (257 ids), so any text round-trips without a vocabulary file."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def random_windows(n=3, length=12, seed=1):
    """``n`` windows of ``length`` random token ids (ids 0-2 left for special tokens)."""
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))
