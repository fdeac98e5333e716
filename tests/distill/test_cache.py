import pytest
import torch

from toolchain.data.batch_order import batch_indices
from toolchain.data.corpus import train_and_heldout
from toolchain.distill import cache as C
from toolchain.errors import UserError
from toolchain.models.load import load_model


@pytest.fixture(scope="module")
def teacher(tiny_dir_6):
    return load_model(str(tiny_dir_6))


@pytest.fixture(scope="module")
def blocks(teacher):
    train, _ = train_and_heldout(teacher.tokenizer, "pydoc", 33, 0.1, 0, 4, max_train_blocks=10)
    return train


def _build(teacher, blocks, out, k=16, **kw):
    tid = C.teacher_digest(teacher.path)
    return C.build_cache(teacher.model, teacher.tokenizer, blocks, out, k, tid, batch_size=4, shard_blocks=4, **kw)


def test_round_trip_matches_teacher_within_fp16(teacher, blocks, tmp_path):
    m = _build(teacher, blocks, tmp_path / "c")
    cache = C.TeacherCache(tmp_path / "c")
    assert len(cache) == 10 and m["shards"] == [
        "shard-00000.safetensors",
        "shard-00001.safetensors",
        "shard-00002.safetensors",
    ]
    b = cache.batch([7, 2])
    assert torch.equal(b.input_ids, blocks[[7, 2], :-1]) and torch.equal(b.labels, blocks[[7, 2], 1:])
    with torch.no_grad():
        ref = torch.log_softmax(teacher.model(blocks[[7, 2], :-1]).logits.float(), -1)
    assert b.teacher_topk_ids.shape == (2, 32, 16)
    # the stored log-probs are the teacher's full-vocabulary log-probs at the stored ids
    torch.testing.assert_close(b.teacher_topk_logprobs, ref.gather(-1, b.teacher_topk_ids), atol=2e-2, rtol=2e-3)
    # and they are the top 16: the 16th is >= everything not stored (up to fp16 rounding)
    kth = b.teacher_topk_logprobs[..., -1]
    assert (ref.topk(17, -1).values[..., -1] <= kth + 1e-2).all()
    tail = 1 - b.teacher_topk_logprobs.exp().sum(-1)
    assert (tail > -1e-2).all() and (tail < 1).all()


def test_bytes_per_token_uint16_ids_fp16_logprobs(teacher, blocks, tmp_path):
    m = _build(teacher, blocks, tmp_path / "c", k=64)
    assert m["id_dtype"] == "uint16"
    # 64 * (2 B id + 2 B log-prob) + 2 B input token = 258 B, plus small safetensors headers
    assert 258 <= m["bytes_per_token"] <= 300
    print(f"bytes/token at k=64: {m['bytes_per_token']:.1f}")


def test_interrupted_build_resumes_to_the_same_cache(teacher, blocks, tmp_path):
    ref = _build(teacher, blocks, tmp_path / "ref")
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, blocks, tmp_path / "c", stop_after_shards=2)
    assert not (tmp_path / "c" / C.MANIFEST).exists()
    assert sorted(p.name for p in (tmp_path / "c").glob("shard-*")) == ref["shards"][:2]
    with pytest.raises(UserError, match="incomplete"):
        C.TeacherCache(tmp_path / "c")
    first = (tmp_path / "c" / ref["shards"][0]).stat().st_mtime_ns
    m = _build(teacher, blocks, tmp_path / "c")
    assert (tmp_path / "c" / ref["shards"][0]).stat().st_mtime_ns == first  # kept, not recomputed
    assert m["fingerprint"] == ref["fingerprint"]
    for s in ref["shards"]:
        assert (tmp_path / "c" / s).read_bytes() == (tmp_path / "ref" / s).read_bytes()


def test_cache_from_another_teacher_tokenizer_or_data_is_refused(teacher, blocks, tmp_path, tiny_dir):
    m = _build(teacher, blocks, tmp_path / "c")
    fp = m["fingerprint"]
    C.TeacherCache(tmp_path / "c", expect=fp)  # the same run: accepted
    other_teacher = dict(fp, teacher=C.teacher_digest(tiny_dir))
    with pytest.raises(UserError, match="another teacher"):
        C.TeacherCache(tmp_path / "c", expect=other_teacher)
    tok = load_model(str(tiny_dir)).tokenizer
    tok.add_tokens(["<brand-new-token>"])
    with pytest.raises(UserError, match="another tokenizer"):
        C.TeacherCache(tmp_path / "c", expect=dict(fp, vocab=C.vocab_digest(tok)))
    with pytest.raises(UserError, match="other training text"):
        C.TeacherCache(tmp_path / "c", expect=dict(fp, data=C.data_digest(blocks[:5])))
    # building into a folder holding another teacher's cache is refused too, not mixed
    with pytest.raises(UserError, match="another teacher"):
        C.build_cache(teacher.model, teacher.tokenizer, blocks, tmp_path / "c", 16, C.teacher_digest(tiny_dir))
    # a variant of the same files (e.g. 8-bit) is another teacher
    assert C.teacher_digest(teacher.path, variant={"quantize": "8bit"}) != C.teacher_digest(teacher.path)


def test_batch_fn_follows_the_loop_order(teacher, blocks, tmp_path):
    _build(teacher, blocks, tmp_path / "c")
    fn = C.cache_batch_fn(C.TeacherCache(tmp_path / "c"), batch_size=3, seed=0)

    for step in (0, 4):
        idx = batch_indices(step, 3, len(blocks), 0)
        assert torch.equal(fn(step).input_ids, blocks[idx, :-1])
    with pytest.raises(UserError, match="fewer than"):
        C.cache_batch_fn(C.TeacherCache(tmp_path / "c"), batch_size=11, seed=0)


def test_not_a_cache(tmp_path):
    with pytest.raises(UserError, match="not a teacher cache"):
        C.TeacherCache(tmp_path)
