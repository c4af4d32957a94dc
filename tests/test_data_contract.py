"""Unit tests of sftune.data.contract: segments -> one sequence with a turn per trained run, the
Format base's inference side (prompt, reference) and the end-of-turn ids."""

import pytest

from sftune.data.contract import BadRow, FormattedExample, Format, Turn, end_of_turn_ids


def test_segments_become_turns_with_their_contexts_and_eos():
    ex = FormattedExample([("Q: a\nA:", False), (" b", True), ("\nQ: c\nA:", 0), (" d", 0.5)], add_eos=True)
    assert ex.text == "Q: a\nA: b\nQ: c\nA: d" and ex.trained_text == " b d"
    seq = ex.to_sequence()
    assert seq.turns == [Turn(context=7, spans=[(7, 9, 1.0)]), Turn(context=17, spans=[(17, 19, 0.5)], eos=0.5)]
    assert seq.text[:seq.turns[1].context] == "Q: a\nA: b\nQ: c\nA:"
    prompt_only = FormattedExample([("just a prompt", False)], add_eos=True).to_sequence()
    assert prompt_only.turns == [Turn(context=13, spans=[], eos=1.0)]  # only the EOS is trained


class QA(Format):
    def __call__(self, row):
        if not row.get("q"):
            raise BadRow("value is null", "q")
        return FormattedExample([(f"Q: {row['q']}\nA:", False), (f" {row.get('a', '')}", True)], add_eos=True)


def test_format_base_prompt_and_reference():
    fmt = QA()
    assert fmt.prompt({"q": "x", "a": "y"}) == "Q: x\nA:" and fmt.reference({"q": "x", "a": "y"}) == " y"
    assert fmt.reference({"q": None}) is None  # a bad row has no reference
    assert fmt.render({"q": "x", "a": "y"}).sequences[0].turns[0].context == len("Q: x\nA:")
    with pytest.raises(BadRow) as e:
        fmt({"q": ""})
    assert e.value.column == "q" and not fmt.is_chat and fmt.add_bos


def test_end_of_turn_ids_include_eos_and_known_end_tokens(tiny_tokenizer):
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    assert end_of_turn_ids(tok) == {tok.eos_token_id}
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    assert end_of_turn_ids(tok) == {tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")}
    assert QA().stop_ids(tok) == sorted(end_of_turn_ids(tok))
