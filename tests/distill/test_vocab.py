import shutil

import pytest
import torch
from conftest import make_tiny_llama

from toolchain.distill.vocab import align_logits, shared_vocab_size
from toolchain.errors import UserError
from toolchain.models.load import load_model


@pytest.fixture(scope="module")
def padded(tmp_path_factory, teacher_dir):
    """The same tokenizer, embedding padded by 128 rows (like 49152 -> 49280)."""
    return load_model(str(make_tiny_llama(tmp_path_factory.mktemp("pad") / "m", teacher_dir, layers=2, vocab_pad=128)))


@pytest.fixture(scope="module")
def plain(tiny_dir):
    return load_model(str(tiny_dir))


def test_padded_vocab_is_aligned_to_the_real_tokens(padded, plain):
    assert padded.model.config.vocab_size == 49280 and plain.model.config.vocab_size == 49152
    v = shared_vocab_size(padded.model, padded.tokenizer, plain.model, plain.tokenizer)
    assert v == 49152 == shared_vocab_size(plain.model, plain.tokenizer, padded.model, padded.tokenizer)
    x = torch.randint(0, 49152, (1, 8))
    with torch.no_grad():
        t, s = padded.model(x).logits, plain.model(x).logits
    s2, t2 = align_logits(s, t, v)
    assert s2.shape == t2.shape == (1, 8, 49152)
    # a KL over aligned rows is finite and well defined
    kl = (t2.log_softmax(-1).exp() * (t2.log_softmax(-1) - s2.log_softmax(-1))).sum(-1)
    assert torch.isfinite(kl).all()
    # both padded the same way: padding rows are still left out of the comparison
    assert shared_vocab_size(padded.model, padded.tokenizer, padded.model, padded.tokenizer) == 49152


def test_different_tokenizers_point_to_sequence_kd(plain, tmp_path):
    from transformers import AutoTokenizer

    d = tmp_path / "other"
    shutil.copytree(plain.path, d)
    tok = AutoTokenizer.from_pretrained(d)
    tok.add_tokens(["<brand-new-token>"])
    with pytest.raises(
        UserError,
        match=r"tokenizers differ \(1 tokens only in the student's.*logit KD needs a shared "
        r"tokenizer.*data.mode: sequences",
    ):
        shared_vocab_size(plain.model, plain.tokenizer, plain.model, tok)


def test_model_smaller_than_its_tokenizer_is_refused(plain, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    small = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=1000,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(UserError, match="1000 output rows but its tokenizer has 49152"):
        shared_vocab_size(small, plain.tokenizer, plain.model, plain.tokenizer)


@pytest.mark.slow
def test_smollm2_vs_gemma_tokenizers_are_refused(teacher_dir):
    """Two real tokenizers (SmolLM2's 49152-token BPE, Gemma's 262144-token SentencePiece)."""

    from transformers import AutoTokenizer

    from toolchain.models.bundled import bundled_path

    g = bundled_path("gemma3-270m")
    gtok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
    stok = AutoTokenizer.from_pretrained(teacher_dir)
    assert len(gtok) == 262144 and len(stok) == 49152
    # the tokenizers are compared before any model is touched
    with pytest.raises(UserError, match="logit KD needs a shared tokenizer"):
        shared_vocab_size(None, stok, None, gtok)
