"""Word-level tokenizer of the tiny retrieval model, built with the ``tokenizers`` library.

The vocabulary is fixed: four special tokens, the ten digits, the task's marker words, the key words
(names that only ever appear as keys) and a list of filler words. Text is lower-cased, split on whitespace, punctuation and between digits (so ``"471:"``
and ``"4 7 1 :"`` give the same ids) and decoded by joining the tokens with single spaces, so
``decode(encode(s))`` gives back the words of ``s``.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = [PAD, BOS, EOS, UNK]
DIGITS = [str(d) for d in range(10)]
MARKERS = ["key", "value", "query", ":", ".", ","]
FILLER_WORDS = """
the a an of to in and or but on at by for with from as is was are were be been has have had do
did not no so if then than that this these those it its he she they we you i me him her them us
my your our their there here when where what which who how why all any some many much more most
few each every other another same such only just also very still even again once soon now later
time day night year week morning evening home house room door window table chair book page letter
word story city town road street river sea lake hill field tree garden flower grass stone rock sky
sun moon star rain snow wind cloud fire water light dark cold warm hot old new young small large
long short high low good bad happy sad quiet loud fast slow early late red blue green yellow white
black brown gray gold silver man woman child boy girl friend family mother father brother sister
king queen doctor teacher farmer driver cat dog bird fish horse cow sheep mouse bread milk tea
apple egg rice soup cake salt sugar walk run go come see look find give take make keep hold bring
read write sing play work rest sleep wake open close turn stand sit fall rise carry think know
feel hear speak tell ask answer begin end start stop wait help move live stay leave
""".split()
KEY_WORDS = """
alfa bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa
quebec romeo sierra tango uniform victor whiskey xray yankee zulu alpha beta gamma epsilon zeta eta
theta iota kappa lambda mu nu xi omicron pi rho sigma tau upsilon phi chi psi omega hydrogen helium
lithium boron carbon nitrogen oxygen fluorine neon sodium magnesium aluminum silicon phosphorus
sulfur chlorine argon potassium calcium iron copper zinc nickel cobalt titanium platinum uranium
radon xenon krypton mercury venus mars jupiter saturn neptune pluto ruby emerald sapphire diamond
topaz opal pearl amber jade onyx quartz garnet
""".split()
VOCAB: list[str] = SPECIALS + DIGITS + MARKERS + KEY_WORDS + FILLER_WORDS
TOKEN_ID: dict[str, int] = {tok: i for i, tok in enumerate(VOCAB)}
assert len(TOKEN_ID) == len(VOCAB), "duplicate word in the tiny vocabulary"

PAD_ID, BOS_ID, EOS_ID, UNK_ID = (TOKEN_ID[t] for t in SPECIALS)

CHAT_TEMPLATE = "{{ bos_token }}{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""The model has no roles: a chat request is ``<s>`` and its messages' text, so the chat endpoint
sends the same ids as the completions endpoint for a one-message chat."""


def build_tokenizer(max_length: int = 8192) -> PreTrainedTokenizerFast:
    """The fast tokenizer over :data:`VOCAB` (``len(VOCAB)`` ids); ``encode`` prepends ``<s>``.

    ``max_length`` is its ``model_max_length`` (the model's ``max_position_embeddings``)."""
    tok = Tokenizer(models.WordLevel(vocab=TOKEN_ID, unk_token=UNK))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Punctuation(),
        pre_tokenizers.Digits(individual_digits=True),
    ])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, BOS_ID)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        clean_up_tokenization_spaces=False, model_max_length=max_length, chat_template=CHAT_TEMPLATE)


def save_tokenizer(out_dir: str | Path, max_length: int = 8192) -> PreTrainedTokenizerFast:
    """Writes ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json`` to ``out_dir``."""
    tok = build_tokenizer(max_length)
    tok.save_pretrained(str(out_dir))
    return tok
