import numpy as np
import pytest

from mxdna_jax import vocab


def test_ids_match_official_table():
    assert vocab.TOKENS == ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "A", "T", "C", "G")
    np.testing.assert_array_equal(vocab.encode("ATCGN"), [2, 5, 6, 7, 8, 1, 3])


def test_lowercase_and_iupac():
    np.testing.assert_array_equal(vocab.encode("acgtn"), vocab.encode("ACGTN"))
    assert set(vocab.nucleotides_to_ids("RYSWKMBDHVryswkmbdhv").tolist()) == {vocab.UNK}


@pytest.mark.parametrize("seq,ch,pos", [("ACGX", "X", 3), ("A C", " ", 1), ("ACGTé", "é", 4), ("U", "U", 0)])
def test_invalid_character_named_with_position(seq, ch, pos):
    with pytest.raises(ValueError) as e:
        vocab.encode(seq)
    assert repr(ch) in str(e.value) and f"position {pos}" in str(e.value)


def test_empty_and_too_long():
    with pytest.raises(ValueError, match="empty"):
        vocab.encode("")
    with pytest.raises(ValueError, match="too long"):
        vocab.encode("A" * 9, max_length=10)
    with pytest.raises(ValueError, match="batch element 1"):
        vocab.encode_batch(["ACG", ""])


def test_batch_padding_and_masks():
    b = vocab.encode_batch(["ACG", "A[MASK]"[:1], "NNNN"], pad_to=8)
    assert b["input_ids"].shape == (3, 8)
    np.testing.assert_array_equal(b["input_ids"][0], [2, 5, 7, 8, 3, 0, 0, 0])
    np.testing.assert_array_equal(b["attention_mask"][0], [1, 1, 1, 1, 1, 0, 0, 0])
    np.testing.assert_array_equal(b["special_tokens_mask"][0], [1, 0, 0, 0, 1, 1, 1, 1])
    # [UNK] is an ordinary position, as in the official tokenizer
    np.testing.assert_array_equal(b["special_tokens_mask"][2][:6], [1, 0, 0, 0, 0, 1])
    with pytest.raises(ValueError, match="pad_to"):
        vocab.encode_batch(["ACGTACGT"], pad_to=4)


def test_fixture_inputs_reencode(fixtures_dir):
    import json

    fx = json.loads((fixtures_dir / "public_small.json").read_text())
    z = np.load(fixtures_dir / "public_small.npz")
    seqs = [s.replace(" ", "").replace("[MASK]", "N") for s in fx["sequences"]]
    b = vocab.encode_batch(seqs, pad_to=z["input_ids"].shape[1])
    ids = z["input_ids"]
    keep = ids != vocab.MASK  # [MASK] has no letter; compare everything else
    np.testing.assert_array_equal(b["input_ids"][keep], ids[keep])
    np.testing.assert_array_equal(b["attention_mask"], z["attention_mask"])


def test_decode_and_reverse_complement():
    ids = vocab.nucleotides_to_ids("AACGTN")
    assert vocab.decode(vocab.reverse_complement_ids(ids)) == "NACGTT"
    assert vocab.decode(vocab.encode("ACGT")) == "ACGT"


@pytest.mark.parametrize("seqs", ["ACGT", b"ACGT"])
def test_encode_batch_refuses_a_single_string(seqs):
    with pytest.raises(TypeError) as e:
        vocab.encode_batch(seqs)
    assert str(e.value) == (f"encode_batch expects a sequence of sequences; got a {type(seqs).__name__} "
                            "(wrap one sequence in a list)")


@pytest.mark.parametrize("bad,name", [(None, "NoneType"), (5, "int"), (["A"], "list")])
def test_encode_batch_names_a_non_string_element(bad, name):
    with pytest.raises(TypeError) as e:
        vocab.encode_batch(["ACG", bad])
    assert str(e.value) == f"sequence 1 is {name}, expected str or bytes"
    with pytest.raises(TypeError, match=f"sequence is {name}, expected str or bytes"):
        vocab.encode(bad)


def test_encode_batch_accepts_bytes_and_tuples():
    b = vocab.encode_batch((b"ACG", "acg"))
    np.testing.assert_array_equal(b["input_ids"][0], b["input_ids"][1])
