"""Small real BPE tokenizers built locally (no hub): byte-level BPE with GPT-2's pre-tokenizer, trained on text with
code, blank lines, trailing spaces and non-ASCII, so whitespace merges across a prompt/completion boundary as it does
in SmolLM2's or Llama 3's tokenizer. Two chat setups:

* ``smollm2_style``: ChatML with SmolLM2-Instruct's default system turn, eos = pad = ``<|im_end|>``, no BOS;
* ``llama3_style``: Llama-3's header template, ``<|begin_of_text|>`` added to plain text, eos ``<|eot_id|>``.
"""

from __future__ import annotations

import random

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
    "'<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_WORDS = (
    "the",
    "model",
    "answer",
    "question",
    "is",
    "what",
    "def",
    "return",
    "print",
    "value",
    "Straße",
    "naïve",
    "日本語",
    "données",
    "for",
    "in",
    "range",
    "Human",
    "Assistant",
    "sure",
    "here",
    "code",
    "x",
    "y",
    "4",
    "12",
    "7",
    "2+2?",
    "Sure",
    "Hello",
    "yes",
    "no",
    "street",
    "→",
    "🙂",
)


def _corpus(seed: int = 0, lines: int = 2000) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(lines):
        words = " ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12)))
        out.append(
            rng.choice(
                [
                    words,
                    words + " ",
                    words + "\n\n",
                    "def f(x):\n    return x\n",
                    "  " + words,
                    words + ":\n    " + words,
                    "Human: " + words + "\n\nAssistant: " + words,
                ]
            )
        )
    return out


def _bpe(specials: list[str], vocab_size: int = 900):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    core.train_from_iterator(_corpus(), trainer)
    return core


def smollm2_style():
    """ChatML + SmolLM2's default system turn; pad is eos (``<|im_end|>``), as in SmolLM2-Instruct."""
    from transformers import PreTrainedTokenizerFast

    core = _bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=SMOLLM2_TEMPLATE,
    )


def llama3_style():
    """Llama 3's chat template; plain text gets ``<|begin_of_text|>`` from the post-processor, as Llama 3's does."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    specials = [
        "<|begin_of_text|>",
        "<|end_of_text|>",
        "<|start_header_id|>",
        "<|end_header_id|>",
        "<|eot_id|>",
        "<|finetune_right_pad_id|>",
    ]
    core = _bpe(specials)
    bos = core.token_to_id("<|begin_of_text|>")
    core.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|finetune_right_pad_id|>",
        chat_template=LLAMA3_TEMPLATE,
    )
