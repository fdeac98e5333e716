"""Can teacher logits be compared with student logits, and over how many vocabulary rows?

Logit KD compares two distributions position by position, so both models must split text into
the same tokens with the same ids. Within one family the tokenizer is often identical while
the embedding tables differ in size: rows are padded to a multiple of 64 or 128 for fast
matmuls (49152 vs 49280), and no token ever maps to a padding row. Those are aligned by using
the shared rows only. Genuinely different tokenizers cannot be aligned token by token; they
get a clear error that points to sequence-level KD, which only needs the teacher's text.
"""

from __future__ import annotations

from toolchain.errors import UserError

SEQUENCE_MODE_HINT = (
    "use sequence-level KD instead (data.mode: sequences, which trains on the teacher's "
    "generated text or your own prompt/response JSONL and needs no shared tokenizer)"
)


def _rows(model) -> int:
    return model.get_output_embeddings().weight.shape[0]


def _vocab_difference(teacher_tok, student_tok) -> str:
    t, s = teacher_tok.get_vocab(), student_tok.get_vocab()
    only_t = sorted(set(t) - set(s), key=t.get)
    only_s = sorted(set(s) - set(t), key=s.get)
    moved = [tok for tok in set(t) & set(s) if t[tok] != s[tok]]
    parts = []
    if only_t:
        parts.append(f"{len(only_t)} tokens only in the teacher's (e.g. {only_t[0]!r})")
    if only_s:
        parts.append(f"{len(only_s)} tokens only in the student's (e.g. {only_s[0]!r})")
    if moved:
        parts.append(f"{len(moved)} with other ids (e.g. {moved[0]!r}: {t[moved[0]]} vs {s[moved[0]]})")
    return "; ".join(parts) or "their special tokens differ"


def shared_vocab_size(teacher, teacher_tok, student, student_tok) -> int:
    """Rows of the logits to compare: every real token, none of either model's padding rows.

    Raises a UserError when the tokenizers differ (logit KD is impossible) or a model has fewer
    output rows than its tokenizer has tokens (a broken checkpoint).
    """
    if teacher_tok.get_vocab() != student_tok.get_vocab():
        raise UserError(
            f"teacher and student tokenizers differ ({_vocab_difference(teacher_tok, student_tok)}); "
            f"logit KD needs a shared tokenizer, so either make the student from the teacher with "
            f"`toolchain student`, or {SEQUENCE_MODE_HINT}"
        )
    n_tokens = len(student_tok)
    for who, model in (("teacher", teacher), ("student", student)):
        if _rows(model) < n_tokens:
            raise UserError(
                f"the {who} has {_rows(model)} output rows but its tokenizer has {n_tokens} tokens; "
                "the checkpoint and tokenizer do not belong together"
            )
    # padding rows past the tokenizer are never a target; the shared real rows are all that count
    return min(_rows(teacher), _rows(student), n_tokens)


def align_logits(student_logits, teacher_logits, vocab: int):
    """Both logits cut to the shared `vocab` rows (a view, no copy)."""
    return student_logits[..., :vocab], teacher_logits[..., :vocab]
