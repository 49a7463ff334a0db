from transformers import CLIPTokenizer

from mos.common.tokenizer import build_tiny_tokenizer, default_words

REQUIRED = [
    "backpack",
    "bowl",
    "can",
    "candle",
    "cat",
    "clock",
    "sneaker",
    "dog",
    "boot",
    "toy",
    "glasses",
    "teapot",
    "vase",
    "cartoon",
    "stuffed",
    "animal",
    "man",
    "woman",
    "girl",
    "boy",
    "person",
    "photo",
    "beach",
    "snow",
]


def test_every_listed_word_is_one_token():
    tok = build_tiny_tokenizer()
    for word in set(default_words()) | set(REQUIRED):
        ids = tok(word, add_special_tokens=False).input_ids
        assert len(ids) == 1, (word, tok.convert_ids_to_tokens(ids))
        assert tok.convert_ids_to_tokens(ids)[0] == word + "</w>"


def test_clip_format_and_unknown_words_fall_back_to_bytes(tmp_path):
    tok = build_tiny_tokenizer()
    ids = tok("A Photo of a DOG").input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    assert tok.convert_ids_to_tokens(ids[1:-1]) == [
        "a</w>",
        "photo</w>",
        "of</w>",
        "a</w>",
        "dog</w>",
    ]
    pieces = tok.convert_ids_to_tokens(tok("zebra", add_special_tokens=False).input_ids)
    assert "".join(pieces).replace("</w>", "") == "zebra" and len(pieces) > 1
    tok.save_pretrained(tmp_path)
    again = CLIPTokenizer.from_pretrained(tmp_path)
    assert again.get_vocab() == tok.get_vocab()
    assert again("a cat on the beach").input_ids == tok("a cat on the beach").input_ids


def test_deterministic():
    assert build_tiny_tokenizer().get_vocab() == build_tiny_tokenizer().get_vocab()
