"""Round trip: text -> prepared shards -> ids, against the tokenizers' own output (WordPiece, SentencePiece,
and a >65536 vocabulary stored as uint32); token counts; tokenizer identity and the reader's tokenizer check."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from pipeline import shards as fmt
from pipeline.data.prepared import DatasetError, PreparedDataset
from pipeline.data_prep.prepare import PrepareConfig, prepare
from pipeline.tokenization import load_tokenizer, token_dtype
from tests.conftest import write_text_docs

UNIT_MB = 0.05  # ~52 KB: the ~140 KB inputs below are cut into 3 byte ranges each
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json")


def clean_docs(texts: list[str]) -> list[str]:
    """The sample documents without blank lines inside them (a blank line separates documents in text)."""
    return ["\n".join(line for line in t.split("\n") if line.strip()) for t in texts]


def split_ids(out, split: str) -> list[list[int]]:
    ds = PreparedDataset(out, split, verify="full")
    return [ds[i].tolist() for i in range(len(ds))]


def ordered_partition(expected: list, train: list, valid: list) -> list[tuple[str, int]]:
    """Assert train and valid are in-order subsequences of `expected` that together make up all of it;
    returns, for each expected document, (split, position in split). `expected` must be duplicate-free."""
    assert len({tuple(e) for e in expected}) == len(expected), "test documents must be distinct"
    assert len(train) + len(valid) == len(expected), (len(train), len(valid), len(expected))
    where, i, j = [], 0, 0
    for k, e in enumerate(expected):
        if i < len(train) and train[i] == e:
            where.append(("train", i))
            i += 1
        elif j < len(valid) and valid[j] == e:
            where.append(("valid", j))
            j += 1
        else:
            pytest.fail(f"input document {k} is neither the next train document ({i}) nor the next valid one ({j})")
    return where


def write_inputs(d, docs: list[str]) -> tuple[list[str], list[str]]:
    """Even documents as blank-line separated text, odd ones as JSON Lines; returns (inputs, docs in input order)."""
    d.mkdir(parents=True, exist_ok=True)
    text_docs, json_docs = docs[0::2], docs[1::2]
    write_text_docs(d / "a.txt", text_docs)
    with open(d / "b.jsonl", "w", encoding="utf-8") as f:
        for i, t in enumerate(json_docs):
            f.write(json.dumps({"id": i, "text": t}) + "\n")
    return [str(d / "a.txt"), str(d / "b.jsonl")], text_docs + json_docs


@pytest.fixture(scope="module")
def docs(sample_texts) -> list[str]:
    return clean_docs(sample_texts)


@pytest.fixture(scope="module")
def wp_dataset(tmp_path_factory, wordpiece_dir, docs):
    d = tmp_path_factory.mktemp("wp")
    inputs, ordered = write_inputs(d / "in", docs)
    out = d / "out"
    manifest = prepare(PrepareConfig(inputs=inputs, output=str(out), tokenizer=wordpiece_dir, unit_mb=UNIT_MB,
                                     valid_fraction=0.1, progress=False))
    return out, ordered, manifest


def test_wordpiece_round_trip_equals_hf_tokenizer(wp_dataset, wordpiece_dir):
    from transformers import AutoTokenizer

    out, ordered, manifest = wp_dataset
    with open(out / "plan.json") as f:
        plan = json.load(f)
    pieces = [p for u in plan["units"] for p in u["pieces"]]
    # both inputs really were read as several independent byte ranges, in several units
    for name in ("a.txt", "b.jsonl"):
        starts = [p["start"] for p in pieces if p["path"].endswith(name)]
        assert len(starts) >= 3 and starts[0] == 0 and all(s > 0 for s in starts[1:]), starts
    assert len(manifest["shards"]["train"]) == len(plan["units"]) >= 5

    hf = AutoTokenizer.from_pretrained(wordpiece_dir)
    expected = hf(ordered, add_special_tokens=False).input_ids
    train, valid = split_ids(out, "train"), split_ids(out, "valid")
    assert train and valid
    ordered_partition(expected, train, valid)
    assert manifest["totals"] == {
        "train": {"documents": len(train), "tokens": sum(map(len, train))},
        "valid": {"documents": len(valid), "tokens": sum(map(len, valid))},
    }
    assert manifest["dtype"] == "uint16"
    info = manifest["tokenizer"]
    assert info["kind"] == "huggingface" and info["vocab_size"] == 30522
    assert info["name_or_path"] == os.path.abspath(wordpiece_dir)
    assert info["special_ids"] == {"pad": 0, "unk": 100, "cls": 101, "sep": 102, "mask": 103, "bos": None,
                                   "eos": None}


def test_wordpiece_decode_gives_back_the_text(wp_dataset, wordpiece_dir):
    out, ordered, _ = wp_dataset
    tok = load_tokenizer(wordpiece_dir)
    train, valid = split_ids(out, "train"), split_ids(out, "valid")
    where = ordered_partition(tok.encode_batch(ordered), train, valid)
    stored = {"train": train, "valid": valid}
    # uncased WordPiece: lowercased, spaces around punctuation may change (the sample text is ASCII, so no
    # accents are stripped and nothing becomes [UNK])
    for k in range(0, len(ordered), 7):
        split, pos = where[k]
        decoded = tok.decode(stored[split][pos])
        assert "".join(decoded.split()) == "".join(ordered[k].lower().split())


def test_split_is_the_documented_hash_of_each_document(wp_dataset, wordpiece_dir):
    """docs/data_format.md: a document goes to `valid` when BLAKE2b with an 8-byte digest, keyed with
    sha256(split_seed)[:16], of its text (as read: a text file's document keeps its final newline), read
    little-endian, is below valid_fraction * 2^64. Checked document by document against the workers' batched
    hashing, for text read in blocks and for JSON Lines."""
    import hashlib

    out, ordered, manifest = wp_dataset
    st = manifest["settings"]
    key = hashlib.sha256(st["split_seed"].encode()).digest()[:16]
    n_text = len(ordered) - len(ordered) // 2  # write_inputs: the even documents went to a.txt
    as_read = [t + "\n" if k < n_text else t for k, t in enumerate(ordered)]
    expected = ["valid" if int.from_bytes(hashlib.blake2b(t.encode(), digest_size=8, key=key).digest(), "little")
                < st["valid_fraction"] * 2 ** 64 else "train" for t in as_read]
    tok = load_tokenizer(wordpiece_dir)
    where = ordered_partition(tok.encode_batch(ordered), split_ids(out, "train"), split_ids(out, "valid"))
    assert [w for w, _ in where] == expected
    assert 0 < expected.count("valid") < len(expected)


def test_token_counts_are_bincount_of_train_tokens(wp_dataset):
    out, _, manifest = wp_dataset
    train = PreparedDataset(out, "train")
    valid = PreparedDataset(out, "valid")
    train_tokens = np.concatenate(list(train.iter_tokens()))
    valid_tokens = np.concatenate(list(valid.iter_tokens()))
    expected = np.bincount(train_tokens, minlength=30522)
    on_disk = np.load(out / "token_counts.npy")
    assert on_disk.dtype == np.int64 and on_disk.shape == (30522,)
    np.testing.assert_array_equal(on_disk, expected)
    np.testing.assert_array_equal(train.token_counts(), expected)
    assert on_disk.sum() == train.n_tokens == manifest["totals"]["train"]["tokens"]
    # valid tokens are not counted
    assert len(valid_tokens) > 0
    assert not np.array_equal(on_disk, np.bincount(np.concatenate([train_tokens, valid_tokens]), minlength=30522))
    # per-unit counts sum to the total
    per_unit = sum(np.load(out / fmt.unit_paths(s["unit"])["counts"]) for s in manifest["shards"]["train"])
    np.testing.assert_array_equal(per_unit, expected)


def test_sentencepiece_round_trip(tmp_path, sentencepiece_model, docs):
    import sentencepiece as spm

    inputs, ordered = write_inputs(tmp_path / "in", docs)
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(inputs=inputs, output=str(out), tokenizer=sentencepiece_model, unit_mb=UNIT_MB,
                                     valid_fraction=0.1, progress=False))
    sp = spm.SentencePieceProcessor(model_file=sentencepiece_model)
    expected = [sp.encode(t) for t in ordered]
    train, valid = split_ids(out, "train"), split_ids(out, "valid")
    assert train and valid
    ordered_partition(expected, train, valid)

    assert manifest["dtype"] == "uint16"
    ds = PreparedDataset(out, "train")
    assert ds.dtype == np.dtype("<u2")
    for shard in manifest["shards"]["train"]:
        raw = np.fromfile(out / shard["bin"], dtype="<u2")
        assert shard["bin_bytes"] == 2 * shard["tokens"] == raw.nbytes
    info = manifest["tokenizer"]
    ref = load_tokenizer(sentencepiece_model).info()
    assert info["kind"] == "sentencepiece"
    assert info["vocab_size"] == 2000 == sp.get_piece_size()
    assert info["name_or_path"] == os.path.abspath(sentencepiece_model)
    assert info["special_ids"] == {"pad": 0, "unk": 1, "bos": 2, "eos": 3, "cls": sp.piece_to_id("[CLS]"),
                                   "sep": sp.piece_to_id("[SEP]"), "mask": sp.piece_to_id("[MASK]")}
    assert len({info["special_ids"][k] for k in ("cls", "sep", "mask")}) == 3
    assert info["fingerprint"] == ref.fingerprint and len(info["fingerprint"]) == 64
    assert info["vocab_fingerprint"] == ref.vocab_fingerprint
    np.testing.assert_array_equal(ds.token_counts(), np.bincount(np.concatenate(train), minlength=2000))


def test_token_dtype():
    assert token_dtype(2000) == np.uint16
    assert token_dtype(30522) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 all fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(250002) == np.uint32


def _write_manifest(out, dtype: str, vocab_size: int, shards: dict, counts: np.ndarray) -> None:
    import hashlib
    import io

    buf = io.BytesIO()
    np.save(buf, counts)
    (out / "token_counts.npy").write_bytes(buf.getvalue())
    totals = {s: {"documents": sum(x["docs"] for x in v), "tokens": sum(x["tokens"] for x in v)}
              for s, v in shards.items()}
    manifest = {"format_version": fmt.FORMAT_VERSION, "dtype": dtype, "index_dtype": "int64",
                "tokenizer": {"name_or_path": "test", "kind": "huggingface", "vocab_size": vocab_size,
                              "special_ids": {}, "vocab_fingerprint": "0" * 64, "fingerprint": "1" * 64},
                "totals": totals, "shards": shards,
                "token_counts": {"file": "token_counts.npy", "split": "train", "bytes": len(buf.getvalue()),
                                 "sha256": hashlib.sha256(buf.getvalue()).hexdigest()}}
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_shard_writer_uint32_round_trips_through_reader(tmp_path):
    vocab = 100_000
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, vocab, size=n).astype(np.int64) for n in (5, 1, 17, 300, 2)]
    docs[0][:] = [65535, 65536, 65537, 99_999, 0]  # around and above the uint16 limit
    shards = {"train": [], "valid": []}
    for unit, group in enumerate((docs[:2], docs[2:])):
        paths = fmt.unit_paths(unit)
        for split in fmt.SPLITS:
            w = fmt.ShardWriter(str(tmp_path), paths[f"{split}_bin"], paths[f"{split}_idx"], token_dtype(vocab))
            if split == "train":
                for d in group:  # one call per document and one for several: both must work
                    w.add(d, np.array([len(d)]))
            shards[split].append({"unit": unit, **w.commit()})
    train = np.concatenate(docs)
    _write_manifest(tmp_path, "uint32", vocab, shards, np.bincount(train, minlength=vocab))

    ds = PreparedDataset(tmp_path, "train", verify="full")
    assert ds.dtype == np.dtype("<u4") and len(ds) == len(docs) and ds.n_tokens == len(train)
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(ds[i], d)
    assert ds[0].tolist() == [65535, 65536, 65537, 99_999, 0]
    np.testing.assert_array_equal(ds.tokens(0, ds.n_tokens), train)
    # stored little-endian, 4 bytes per id
    raw = (tmp_path / "train" / "000000.bin").read_bytes()
    assert len(raw) == 4 * 6 and raw[4:8] == (65536).to_bytes(4, "little")
    np.testing.assert_array_equal(ds.token_counts(), np.bincount(train, minlength=vocab))
    assert len(PreparedDataset(tmp_path, "valid")) == 0


def test_large_vocabulary_prepares_as_uint32(tmp_path, docs):
    """End to end with a real (word-level) Hugging Face tokenizer of 80,000 ids, most words above 65535."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    some = docs[:40]
    words = sorted({w for t in some for w in t.lower().split()})
    specials = ["[UNK]", "[PAD]", "[CLS]", "[SEP]", "[MASK]"]
    size = 80_000
    assert len(words) < size - 70_000
    vocab = {t: i for i, t in enumerate(specials)}
    vocab.update({f"<filler{i}>": i for i in range(len(specials), size - len(words))})
    vocab.update({w: size - len(words) + i for i, w in enumerate(words)})
    assert len(vocab) == size
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = tmp_path / "tok"
    PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                            sep_token="[SEP]", mask_token="[MASK]").save_pretrained(folder)

    with open(tmp_path / "docs.jsonl", "w") as f:
        for t in some:
            f.write(json.dumps({"text": t}) + "\n")
    out = tmp_path / "out"
    manifest = prepare(PrepareConfig(inputs=[str(tmp_path / "docs.jsonl")], output=str(out), tokenizer=str(folder),
                                     unit_mb=0.01, valid_fraction=0.2, progress=False))
    assert manifest["dtype"] == "uint32" and manifest["tokenizer"]["vocab_size"] == size
    assert len(manifest["shards"]["train"]) >= 3
    expected = [core.encode(t, add_special_tokens=False).ids for t in some]
    assert max(max(e) for e in expected) >= 65536 and min(min(e) for e in expected) >= size - len(words)
    train, valid = split_ids(out, "train"), split_ids(out, "valid")
    ordered_partition(expected, train, valid)
    for shard in manifest["shards"]["train"] + manifest["shards"]["valid"]:
        assert shard["bin_bytes"] == 4 * shard["tokens"] == os.path.getsize(out / shard["bin"])
    ds = PreparedDataset(out, "train", tokenizer=str(folder))
    assert ds.dtype == np.dtype("<u4")
    np.testing.assert_array_equal(ds.token_counts(), np.bincount(np.concatenate(train), minlength=size))


# -- tokenizer identity ---------------------------------------------------------------------------------------

def copy_tokenizer(src: str, dst) -> str:
    os.makedirs(dst)
    for name in TOKENIZER_FILES:
        shutil.copy(os.path.join(src, name), dst)
    return str(dst)


def make_cased_copy(src: str, dst) -> str:
    """The same vocabulary, but no lowercasing."""
    copy_tokenizer(src, dst)
    tj = os.path.join(dst, "tokenizer.json")
    with open(tj) as f:
        spec = json.load(f)
    assert spec["normalizer"]["lowercase"] is True
    spec["normalizer"]["lowercase"] = False
    with open(tj, "w") as f:
        json.dump(spec, f)
    tc = os.path.join(dst, "tokenizer_config.json")
    with open(tc) as f:
        conf = json.load(f)
    conf["do_lower_case"] = False
    with open(tc, "w") as f:
        json.dump(conf, f)
    return str(dst)


def test_fingerprint_identity(tmp_path, wordpiece_dir, sentencepiece_model):
    a = load_tokenizer(wordpiece_dir).info()
    b = load_tokenizer(wordpiece_dir).info()
    assert a.fingerprint == b.fingerprint and a.vocab_fingerprint == b.vocab_fingerprint
    assert len(a.fingerprint) == 64 and a.fingerprint != a.vocab_fingerprint
    # identity is behaviour, not location: a copy of the files elsewhere is the same tokenizer
    moved = load_tokenizer(copy_tokenizer(wordpiece_dir, tmp_path / "copy")).info()
    assert moved.fingerprint == a.fingerprint and moved.name_or_path != a.name_or_path
    sp = load_tokenizer(sentencepiece_model).info()
    assert sp.fingerprint != a.fingerprint and sp.vocab_fingerprint != a.vocab_fingerprint
    assert load_tokenizer(sentencepiece_model).info().fingerprint == sp.fingerprint
    # same vocabulary, different normalisation: another tokenizer
    cased_tok = load_tokenizer(make_cased_copy(wordpiece_dir, tmp_path / "cased"))
    assert cased_tok.encode("Hello") != load_tokenizer(wordpiece_dir).encode("Hello")
    cased = cased_tok.info()
    assert cased.vocab_fingerprint == a.vocab_fingerprint
    assert cased.fingerprint != a.fingerprint


def test_reader_refuses_another_tokenizer(tmp_path, wp_dataset, wordpiece_dir, sentencepiece_model):
    from transformers import AutoTokenizer

    out, _, manifest = wp_dataset
    with pytest.raises(DatasetError) as e:
        PreparedDataset(out, tokenizer=sentencepiece_model)
    msg = str(e.value)
    assert os.path.abspath(wordpiece_dir) in msg and os.path.abspath(sentencepiece_model) in msg
    assert manifest["tokenizer"]["fingerprint"][:12] in msg
    with pytest.raises(DatasetError, match="differs from"):
        PreparedDataset(out, tokenizer=make_cased_copy(wordpiece_dir, tmp_path / "cased"))
    with pytest.raises(DatasetError, match="the given fingerprint"):
        PreparedDataset(out, tokenizer="0" * 64)
    with pytest.raises(DatasetError):
        PreparedDataset(out, tokenizer=load_tokenizer(sentencepiece_model))

    # the right tokenizer, in every form the reader accepts
    n = len(PreparedDataset(out))
    for tok in (wordpiece_dir, AutoTokenizer.from_pretrained(wordpiece_dir), load_tokenizer(wordpiece_dir),
                manifest["tokenizer"]["fingerprint"], copy_tokenizer(wordpiece_dir, tmp_path / "copy")):
        assert len(PreparedDataset(out, "train", tokenizer=tok)) == n
