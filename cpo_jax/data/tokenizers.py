"""A self-contained byte-level chat tokenizer (no hub download), for tests, tiny models and bundled data.

Vocabulary: 4 special tokens (``<pad>``, ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>``) followed by
the 256 byte symbols of GPT-2's byte-level alphabet, so any UTF-8 text round-trips exactly. The chat
template is ChatML; ``<|im_end|>`` is the end-of-sequence token.
"""

from __future__ import annotations

SPECIAL_TOKENS = ("<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def byte_chat_tokenizer():
    """A ``PreTrainedTokenizerFast`` with 260 ids (pad 0, eos 3) and a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: i for i, token in enumerate([*SPECIAL_TOKENS, *alphabet])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|endoftext|>", "<|im_start|>"],
        chat_template=CHATML_TEMPLATE,
    )
