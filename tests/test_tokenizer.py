from qwenvl_train.data.tokenizer import MODEL_VOCAB_SIZE, SPECIAL_TOKEN_IDS, get_tokenizer

RELEASED_IDS = {
    "<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
    "<|extra_0|>": 151646, "<|extra_204|>": 151850,
    "<ref>": 151851, "</ref>": 151852, "<box>": 151853, "</box>": 151854,
    "<quad>": 151855, "</quad>": 151856, "<img>": 151857, "</img>": 151858, "<imgpad>": 151859,
}


def test_special_token_ids_match_released_tokenizer():
    tok = get_tokenizer()
    for text, expected in RELEASED_IDS.items():
        assert SPECIAL_TOKEN_IDS[text] == expected
        assert tok.encode(text, allow_special=True) == [expected]
    assert tok.vocab_size == 151860 <= MODEL_VOCAB_SIZE
    assert (tok.eod_id, tok.pad_id, tok.img_pad_id) == (151643, 151643, 151859)


def test_real_bpe_ids_and_round_trip():
    tok = get_tokenizer()
    # Ids of the real Qwen vocabulary (identical in Qwen, Qwen2 and Qwen2.5).
    assert tok.encode("Hello world") == [9707, 1879]
    text = "A cat sits on 2 mats. 一只猫坐在垫子上。"
    assert tok.decode(tok.encode(text)) == text


def test_special_strings_in_data_stay_plain_text():
    tok = get_tokenizer()
    ids = tok.encode("caption with <img> inside")
    assert tok.img_start_id not in ids
    assert tok.decode(ids) == "caption with <img> inside"
