import pytest

from toolchain.data.corpus import check_enough_blocks, load_documents, read_text_file, train_and_heldout
from toolchain.errors import UserError
from toolchain.models.load import load_model


@pytest.fixture(scope="module")
def tok(tiny_dir):
    return load_model(str(tiny_dir)).tokenizer


def test_text_file_documents_crlf_and_bom(tmp_path):
    p = tmp_path / "t.txt"
    p.write_bytes("\ufeffdoc one\r\n\r\n\r\ndoc two\r\nline".encode("utf-8"))
    assert load_documents(str(p)) == ["doc one", "doc two\nline"]


def test_non_utf8_text_names_the_line_and_byte(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes(b"first line\nsecond caf\xe9\n")
    with pytest.raises(UserError, match=r"latin1\.txt:2: not UTF-8 text \(byte 0xe9 at offset 21\)"):
        load_documents(str(p))


def test_empty_file_is_refused(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("  \n\n")
    with pytest.raises(UserError, match="is empty"):
        read_text_file(p)


def test_single_document_is_refused(tmp_path, tok):
    p = tmp_path / "one.txt"
    p.write_text("just one paragraph without blank lines")
    with pytest.raises(UserError, match="holds one document"):
        train_and_heldout(tok, str(p), 33, 0.1, 0, 4)


def test_too_short_dataset_says_how_many_tokens(tmp_path, tok):
    p = tmp_path / "short.txt"
    p.write_text("a short document\n\n\nanother short one\n\n\nand a third")
    with pytest.raises(UserError, match=r"the training split of .* has \d+ tokens, fewer than one block of 129 tokens"):
        train_and_heldout(tok, str(p), 129, 0.3, 0, 4)


def test_fewer_blocks_than_a_batch(tok):
    train, _ = train_and_heldout(tok, "pydoc", 33, 0.1, 0, 4, max_train_blocks=3)
    with pytest.raises(
        UserError,
        match=r"3 training blocks \(99 tokens\), fewer than distill.batch_size=4 blocks \(132 tokens needed\)",
    ):
        check_enough_blocks(train, 4, "pydoc")
    check_enough_blocks(train, 3, "pydoc")
