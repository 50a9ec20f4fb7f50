"""Copy-aligned targets: a copied value's tokens break where the prompt's do; the text never changes."""

import json

from lorakit.data.copy_aligned import aligned_target_ids
from lorakit.data.tokenize import IGNORE, tokenize_record

FIELDS = frozenset({"item", "deliver_to"})


def _order(message: str, answer: dict) -> dict:
    return {"messages": [{"role": "user", "content": message}, {"role": "assistant", "content": json.dumps(answer)}]}


def _target_pieces(example, tokenizer) -> list[str]:
    return [tokenizer.decode([t]) for t, label in zip(example.input_ids, example.labels, strict=True) if label != IGNORE]


def _pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([t]) for t in tokenizer(text, add_special_tokens=False)["input_ids"]]


def test_a_singular_copied_from_a_plural_follows_the_plurals_tokens_then_ends_with_what_is_left(smol_tokenizer):
    record = _order("Could you bring eleven spicy scones in medium?",
                    {"item": "spicy scone", "quantity": 11, "size": "medium", "deliver_to": None})
    plain, _ = tokenize_record(record, smol_tokenizer, max_length=1024)
    aligned, _ = tokenize_record(record, smol_tokenizer, max_length=1024, copy_fields=FIELDS)
    assert smol_tokenizer.decode(aligned.input_ids) == smol_tokenizer.decode(plain.input_ids)
    prompt_words = _pieces(smol_tokenizer, " scones")
    assert _pieces(smol_tokenizer, " scone") != prompt_words[:-1] + ["e"]  # the case at hand: they differ
    pieces = _target_pieces(aligned, smol_tokenizer)
    start = pieces.index(prompt_words[0])
    assert pieces[start:start + len(prompt_words)] == prompt_words[:-1] + ["e"]
    assert "".join(pieces) == "".join(_target_pieces(plain, smol_tokenizer))
    # only the value moved: the keys, numbers and the end of turn are tokenized as before
    assert pieces[-8:] == _target_pieces(plain, smol_tokenizer)[-8:]


def test_an_all_caps_message_gives_lowercase_pieces_cut_where_its_tokens_are(smol_tokenizer):
    record = _order("3 LARGE LATTES TO 12 OAK STREET",
                    {"item": "latte", "quantity": 3, "size": "large", "deliver_to": "12 OAK STREET"})
    aligned, _ = tokenize_record(record, smol_tokenizer, max_length=1024, copy_fields=FIELDS)
    cuts, left = [], len("latte")  # the prompt's pieces of "LATTES", lowercased, as far as "latte" goes
    for piece in _pieces(smol_tokenizer, " LATTES"):
        piece = piece.lstrip().lower()[:left] if not cuts else piece.lower()[:left]
        left -= len(piece)
        cuts += [piece] if piece else []
    expected = [p for cut in cuts for p in _pieces(smol_tokenizer, cut)]
    pieces = _target_pieces(aligned, smol_tokenizer)
    assert pieces[4:4 + len(expected)] == expected  # after '{"', 'item', '":', ' "'
    assert pieces[4 + len(expected)].startswith('"')
    assert json.loads("".join(pieces).split("<|im_end|>")[0])["item"] == "latte"


def test_values_that_are_no_span_of_the_prompt_or_need_escapes_keep_the_plain_tokens(smol_tokenizer):
    prompt_ids = smol_tokenizer("2 pizzas to 2 Oak Street - both pepperoni", add_special_tokens=False)["input_ids"]
    for answer in ({"item": "pepperoni pizza", "deliver_to": "2 Oak Street"},  # the item is no span
                   {"item": "café \"latte\"", "deliver_to": None}):
        target = json.dumps(answer)
        plain = smol_tokenizer(target, add_special_tokens=False)["input_ids"]
        aligned = aligned_target_ids(target, prompt_ids, smol_tokenizer, frozenset({"item"}))
        assert aligned == plain
        assert smol_tokenizer.decode(aligned) == target


def test_a_span_inside_a_word_is_not_a_copy_and_fields_not_named_are_left_alone(smol_tokenizer):
    prompt_ids = smol_tokenizer("I want pancakes", add_special_tokens=False)["input_ids"]
    for answer, fields in (({"item": "cake"}, FIELDS), ({"note": "pancake"}, FIELDS)):
        target = json.dumps(answer)
        assert aligned_target_ids(target, prompt_ids, smol_tokenizer, fields) == \
            smol_tokenizer(target, add_special_tokens=False)["input_ids"]


def test_an_answer_that_is_not_json_is_tokenized_plainly(smol_tokenizer):
    prompt_ids = smol_tokenizer("spicy scones", add_special_tokens=False)["input_ids"]
    for target in ("spicy scone", '{"item": "spicy scone"', "[1, 2]"):
        assert aligned_target_ids(target, prompt_ids, smol_tokenizer, FIELDS) == \
            smol_tokenizer(target, add_special_tokens=False)["input_ids"]


def test_a_tokenizer_that_spaces_every_piece_keeps_plain_tokens_and_says_so(tmp_path):
    """SentencePiece-style tokenizers put a space marker before any text tokenized alone: cutting a
    value into pieces would change its text, so the answer keeps its plain tokens, with a warning."""
    import warnings

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorakit.data.copy_aligned import pieces_keep_their_text
    from lorakit.data.tokenize import tokenize_file

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.pre_tokenizer, core.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    text = ["eleven spicy scones please", "one spicy scone", '{"item": "spicy scone"}'] * 20
    core.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<unk>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<unk>")
    assert not pieces_keep_their_text(tokenizer)
    prompt_ids = tokenizer("eleven spicy scones please", add_special_tokens=False)["input_ids"]
    target = '{"item": "spicy scone"}'
    assert aligned_target_ids(target, prompt_ids, tokenizer, FIELDS) == \
        tokenizer(target, add_special_tokens=False)["input_ids"]
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "eleven spicy scones please", "completion": target}) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tokenize_file(data, tokenizer, 64, FIELDS)
    assert any("keep their plain tokens" in str(w.message) for w in caught)


def test_the_byte_level_tokenizer_keeps_the_text_of_pieces(smol_tokenizer):
    from lorakit.data.copy_aligned import pieces_keep_their_text

    assert pieces_keep_their_text(smol_tokenizer)
