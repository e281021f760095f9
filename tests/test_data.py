import dataclasses
import re
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from jaxsparse import configs
from jaxsparse.config import ConfigError, apply_overrides, validate
from jaxsparse.data import Shard, make_stream
from jaxsparse.data import corpus, store, synthetic

from helpers import tiny_config


@pytest.fixture(scope="module")
def text_stream():
    return make_stream(tiny_config())


def test_text_batches_are_a_pure_function_of_seed_and_step(text_stream):
    again = make_stream(tiny_config())
    for step in (0, 1, 57):
        a, b = text_stream.batch(step), again.batch(step)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(text_stream.batch(0)["inputs"], text_stream.batch(1)["inputs"])
    other_seed = make_stream(tiny_config("data.seed=1"))
    assert not np.array_equal(text_stream.batch(0)["inputs"], other_seed.batch(0)["inputs"])


def test_targets_are_inputs_shifted_by_one(text_stream):
    b = text_stream.batch(3)
    np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
    assert b["inputs"].shape == (8, 32) and b["inputs"].dtype == np.int32
    assert b["inputs"].max() < 256 and b["mask"].min() == 1.0


def test_packed_documents_start_a_new_id_after_every_separator(tmp_path):
    from jaxsparse.data.stream import document_ids
    from helpers import short_documents

    inputs = np.array([[5, 0, 7, 8, 0, 0, 9], [0, 1, 2, 3, 4, 5, 6]], np.int32)
    np.testing.assert_array_equal(document_ids(inputs), [[0, 0, 1, 1, 1, 2, 3],
                                                         [0, 1, 1, 1, 1, 1, 1]])
    stream = make_stream(tiny_config("data.packed_documents=true", *short_documents(tmp_path)))
    batch = stream.batch(0)
    np.testing.assert_array_equal(batch["segment_ids"], document_ids(batch["inputs"]))
    assert (batch["segment_ids"][:, -1] > 0).all()  # every 32-byte window crosses a file end
    assert "segment_ids" not in make_stream(tiny_config()).batch(0)


def test_process_shards_partition_the_global_batch():
    cfg = tiny_config()
    full = make_stream(cfg).batch(5)
    parts = [make_stream(cfg, Shard(i, 4)).batch(5) for i in range(4)]
    np.testing.assert_array_equal(np.concatenate([p["inputs"] for p in parts]), full["inputs"])
    with pytest.raises(ConfigError, match="not divisible by the 3 processes"):
        make_stream(cfg, Shard(0, 3)).batch(0)
    # explicit rows (a process whose devices hold rows 2..5, or all of them)
    np.testing.assert_array_equal(make_stream(cfg, Shard(span=(2, 6))).batch(5)["inputs"],
                                  full["inputs"][2:6])
    np.testing.assert_array_equal(make_stream(cfg, Shard(1, 2, span=(0, 8))).batch(5)["inputs"],
                                  full["inputs"])
    with pytest.raises(ConfigError, match=r"rows \[4, 9\) reach past the global batch"):
        make_stream(cfg, Shard(span=(4, 9))).batch(0)


@pytest.mark.parametrize("args, message", [
    ((0, 0), r"count=0 processes: must be >= 1"),
    ((4, 4), r"index=4 must be in \[0, count=4\)"),
    ((-1, 4), r"index=-1 must be in \[0, count=4\)"),
    ((0.5, 2), r"index=0.5 must be an integer"),
    ((0, 1, (3, 3)), r"span=\(3, 3\): the rows \[start, stop\) need 0 <= start < stop"),
    # a span of the wrong type failed later, in rows() (a float), or not at all (True: row 1)
    ((0, 1, (0.5, 3)), r"span=\(0.5, 3\) must be a pair of integers \(start, stop\)"),
    ((0, 1, (True, 3)), r"span=\(True, 3\) must be a pair of integers"),
    ((0, 1, (1,)), r"span=\(1,\) must be a pair of integers"),
    ((0, 1, "ab"), r"span='ab' must be a pair of integers"),
])
def test_a_shard_outside_its_processes_is_refused(args, message):
    """Shard(5, 4) read rows 40-47 of an 8-row batch (none), Shard(0, 0) divided by zero."""
    with pytest.raises(ValueError, match=message):
        Shard(*args)


@pytest.mark.parametrize("overrides, message", [
    (["data.batch_size=0"], r"data.batch_size=0: must be >= 1"),  # was: empty batches
    (["data.seq_len=0"], r"data.seq_len=0: must be >= 1"),
    (["data.seq_len=-5"], r"data.seq_len=-5: must be >= 1"),  # was: a tensorstore IndexError
    (["data.valid_every=0"], r"data.valid_every=0: must be >= 2"),  # was: ZeroDivisionError
    # every file validation: the split held out one file instead, the opposite
    (["data.valid_every=1"], r"data.valid_every=1: must be >= 2 \(every n-th file is held out"),
    (["data.seed=-1"], r"data.seed=-1: must be in \[0, 2\*\*32\)"),
    (["data.cache_dir= "], r"data.cache_dir=' ': give a path, or leave it unset"),
    (["data.task=mqar", "model.vocab_size=64", "data.num_kv_pairs=0"],
     r"data.num_kv_pairs=0: must be >= 1"),
    (["data.task=mqar", "model.vocab_size=64", "data.num_kv_pairs=32"],
     r"model.vocab_size=64 too small for data.num_kv_pairs=32"),
    (["data.task=mqar", "model.vocab_size=64", "data.num_kv_pairs=4", "data.batch_size=0"],
     r"data.batch_size=0: must be >= 1"),
    (["data.task=multi_hop", "data.hops=0"], r"data.task='multi_hop': multi_hop: data.hops=0"),
])
def test_make_stream_checks_the_keys_it_reads(overrides, message):
    """make_stream on an unvalidated config: the ConfigErrors validate gives for these keys."""
    with pytest.raises(ConfigError, match=message):
        make_stream(tiny_config(*overrides))
    with pytest.raises(ConfigError, match=message):
        validate(tiny_config(*overrides))
    cfg = tiny_config()
    with pytest.raises(ConfigError, match=r"data.batch_size=True: expected <class 'int'>"):
        make_stream(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=True)))


def test_default_corpus_is_split_by_file():
    root, files = corpus.corpus_files(None)
    assert len(files) > 100 and all(f.suffix == ".py" for f in files)
    assert files == sorted(files)
    splits = corpus.split_files(root, files, 20)
    assert set(splits["train"]).isdisjoint(splits["valid"])
    assert len(splits["train"]) + len(splits["valid"]) == len(files)
    assert 0.01 < len(splits["valid"]) / len(files) < 0.15


def test_a_few_files_always_hold_one_out_and_a_single_file_warns(tmp_path):
    """Three files none of whose hashes is 0 mod 20 (86% of three-file corpora): the
    validation split used to fall back to the training files silently."""
    files = [tmp_path / name for name in ("a.txt", "b.txt", "c.txt")]
    hashes = [zlib.crc32(f.name.encode()) for f in files]
    assert all(h % 20 for h in hashes)  # the case this test is about
    held_out = files[hashes.index(min(hashes))]
    for valid_every in (20, 1):  # no file hashes to validation; every file does
        splits = corpus.split_files(tmp_path, files, valid_every)
        assert splits["valid"] == [held_out]
        assert splits["train"] == [f for f in files if f != held_out]
    from jaxsparse.errors import CorpusWarning

    with pytest.warns(CorpusWarning, match="the corpus is a single file .*a.txt.*validation "
                                         "metrics are measured on the training text"):
        splits = corpus.split_files(tmp_path, files[:1], 20)
    assert splits == {"train": files[:1], "valid": files[:1]}


def test_split_does_not_move_when_a_file_is_added_outside_the_matched_ones(tmp_path):
    """Hashes are taken relative to the glob's literal prefix (here ``tmp_path``), not to the
    common parent of today's files (``tmp_path/a``, which became ``tmp_path`` once ``b/``
    held a file: every hash moved, and validation files went to training)."""
    (tmp_path / "a").mkdir()
    for i in range(60):
        (tmp_path / "a" / f"f{i}.txt").write_text(f"t {i}\n")
    pattern = f"{tmp_path}/**/*.txt"

    def split():
        root, files = corpus.corpus_files(pattern)
        assert root == tmp_path.resolve()
        return corpus.split_files(root, files, 20)

    before = split()
    assert len(before["valid"]) > 1  # held out by hash, not by the fallback
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "new.txt").write_text("x\n")
    after = split()
    assert set(before["valid"]) <= set(after["valid"])
    assert set(before["train"]) <= set(after["train"])
    assert corpus.literal_prefix("/data/a/**/*.txt") == corpus.literal_prefix("/data/a/f?.txt")
    assert corpus.literal_prefix("/data/a/b.txt") == corpus.literal_prefix("/data/a/*") \
        == Path("/data/a")
    assert corpus.literal_prefix("*.txt") == Path(".")


def test_a_cache_dir_that_is_a_file_is_a_config_error_naming_it(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("some text " * 10)
    (tmp_path / "a_file").write_text("")
    corpus_glob, file = f"data.path={tmp_path}/*.txt", re.escape(str(tmp_path / "a_file"))
    with pytest.raises(ConfigError, match=rf"data.cache_dir='{file}' is a file, not a directory"):
        make_stream(tiny_config(corpus_glob, f"data.cache_dir={tmp_path}/a_file"))
    # a parent that is a file: the OSError of mkdir, with the key it came from
    with pytest.raises(ConfigError, match=rf"data.cache_dir='{file}/cache': cannot write the "
                                          "token cache there: .*Not a directory"):
        make_stream(tiny_config(corpus_glob, f"data.cache_dir={tmp_path}/a_file/cache"))


def test_cache_dirs_with_dot_dot_relative_or_home_paths_build_the_cache(tmp_path, monkeypatch):
    """Tensorstore's file driver refuses a path with a ``..`` segment: given as it was, such a
    ``data.cache_dir`` or ``$JAXSPARSE_CACHE`` failed as "cannot write the token cache there"
    although the directory was writable. Each is now made absolute first (a relative one
    against the working directory, ``~`` expanded); a backslash, which the driver reads as a
    separator, is refused by name."""
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text("some text " * 10)
    (tmp_path / "sub").mkdir()
    corpus_glob = f"data.path={tmp_path}/*.txt"
    make_stream(tiny_config(corpus_glob, f"data.cache_dir={tmp_path}/sub/../given")).batch(0)
    assert any((tmp_path / "given").glob("bytes-*.zarr"))
    monkeypatch.chdir(tmp_path / "sub")
    make_stream(tiny_config(corpus_glob, "data.cache_dir=../relative")).batch(0)
    assert any((tmp_path / "relative").glob("bytes-*.zarr"))
    monkeypatch.setenv("JAXSPARSE_CACHE", "../from_env")
    make_stream(tiny_config(corpus_glob)).batch(0)
    assert any((tmp_path / "from_env").glob("bytes-*.zarr"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("JAXSPARSE_CACHE", "~/home_cache")
    make_stream(tiny_config(corpus_glob)).batch(0)
    assert any((tmp_path / "home_cache").glob("bytes-*.zarr"))
    with pytest.raises(ConfigError, match=r"data.cache_dir='.*back\\\\slash' contains a "
                                          "backslash"):
        make_stream(tiny_config(corpus_glob, f"data.cache_dir={tmp_path}/back\\slash"))
    assert not (tmp_path / "back").exists()


@pytest.mark.filterwarnings("ignore:the corpus is a single file:UserWarning")
def test_every_window_start_is_drawn_and_one_window_is_enough(tmp_path):
    """Training windows of seq_len + 1 bytes start anywhere in [0, N - seq_len - 1], the last
    start included (its final target is the corpus's final byte), and a split of exactly
    seq_len + 1 bytes holds one window. (Both were one byte short.)"""
    cache = f"data.cache_dir={tmp_path}/cache"
    text = bytes(range(65, 65 + 33))  # + its NUL: N = 34 = seq_len + 2, two window starts
    (tmp_path / "two.txt").write_bytes(text)
    stream = make_stream(tiny_config(f"data.path={tmp_path}/two.txt", cache))
    batches = [stream.batch(step) for step in range(20)]
    assert {int(b["inputs"][row, 0]) - 65 for b in batches for row in range(8)} == {0, 1}
    assert 0 in {int(b["targets"][row, -1]) for b in batches for row in range(8)}  # the NUL
    (tmp_path / "one.txt").write_bytes(text[:32])  # + its NUL: N = 33 = seq_len + 1
    one = make_stream(tiny_config(f"data.path={tmp_path}/one.txt", cache))
    for batch in (one.batch(0), one.eval_batch(0, 1)):
        np.testing.assert_array_equal(batch["inputs"][0], list(text[:32]))
        assert batch["targets"][0, -1] == 0
    (tmp_path / "short.txt").write_bytes(text[:31])  # + its NUL: N = 32, no whole window
    with pytest.raises(ConfigError, match=r"the train split holds 32 bytes, fewer than "
                                          r"data.seq_len\+1=33; use more text or a shorter "
                                          "data.seq_len"):
        make_stream(tiny_config(f"data.path={tmp_path}/short.txt", cache))


def test_user_glob_and_token_cache(tmp_path):
    for i in range(30):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * 20)
    cfg = tiny_config(f"data.path={tmp_path}/*.txt", f"data.cache_dir={tmp_path}/cache")
    s = make_stream(cfg)
    assert s.num_files["train"] + s.num_files["valid"] == 30
    text = bytes(s.batch(0)["inputs"][0].astype(np.uint8))
    assert b"document" in text or b"number" in text
    assert len(list((tmp_path / "cache").glob("bytes-*.zarr"))) == 2
    # the cache holds exactly the files' bytes, NUL-separated
    files = sorted(tmp_path.glob("*.txt"))
    tokens = store.tokenize_files(files[:2])
    assert bytes(tokens) == files[0].read_bytes() + b"\0" + files[1].read_bytes() + b"\0"


def test_a_window_outside_the_tokens_is_an_index_error_not_a_damaged_cache(tmp_path):
    files = [tmp_path / "a.txt"]
    files[0].write_text("x" * 100)
    tokens = store.open_tokens(files, tmp_path / "cache")  # 101 tokens with the separator
    edge = store.read_windows(tokens, np.array([0, 91]), 10)
    assert edge.shape == (2, 10) and edge[1, -1] == 0  # the last window ends at the NUL
    for start in (92, -1):
        with pytest.raises(IndexError, match=rf"the window \[{start}, {start + 10}\) is outside "
                                             r"the 101 tokens \(a start must be in \[0, 91\]\)"):
            store.read_windows(tokens, np.array([0, start]), 10)


def test_the_token_cache_is_built_once_and_reused(tmp_path, monkeypatch):
    """Re-opening tokenises nothing; editing a file rebuilds the cache of its split only. (The
    test this replaces compared modification times, which a rebuild whose rename lost to the
    existing cache leaves alone: it could not fail.)"""
    for i in range(30):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * 20)
    cfg = tiny_config(f"data.path={tmp_path}/*.txt", f"data.cache_dir={tmp_path}/cache")
    built, build = [], store._build
    monkeypatch.setattr(store, "_build", lambda files, *a: (built.append(files), build(files, *a)))
    first = make_stream(cfg)
    assert len(built) == 2  # train and valid
    again = make_stream(cfg)
    assert len(built) == 2
    np.testing.assert_array_equal(first.batch(4)["inputs"], again.batch(4)["inputs"])
    root, files = corpus.corpus_files(f"{tmp_path}/*.txt")
    valid = corpus.split_files(root, files, cfg.data.valid_every)["valid"]
    valid[0].write_text("edited\n" * 30)
    make_stream(cfg)
    assert len(built) == 3 and built[-1] == valid


def test_a_damaged_token_cache_is_a_config_error_naming_it(tmp_path):
    """A deleted chunk read back as zeros (tensorstore fills missing chunks by default)."""
    for i in range(30):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * 20)
    cfg = tiny_config(f"data.path={tmp_path}/*.txt", f"data.cache_dir={tmp_path}/cache")
    stream = make_stream(cfg)
    cached = sorted((tmp_path / "cache").glob("bytes-*.zarr"))
    for array in cached:  # while the stream is open: the next read fails
        (array / "0").unlink()
    damaged = (rf"the token cache '{re.escape(str(tmp_path / 'cache'))}/bytes-\w+\.zarr' is "
               r"damaged \((.*)\); delete that directory and run again: it is rebuilt from the "
               "corpus")
    with pytest.raises(ConfigError, match=damaged.replace("(.*)", r'NOT_FOUND: chunk \{0\} '
                                                          r'stored at local file ".*" is missing')):
        stream.batch(0)
    with pytest.raises(ConfigError, match=damaged.replace("(.*)", "1 of its 1 chunk files are "
                                                          "missing, the first '0'")):
        make_stream(cfg)  # found when the cache is opened
    for array in cached:
        (array / ".zarray").write_text("{not json")
    with pytest.raises(ConfigError, match=damaged.replace("(.*)", ".*Invalid JSON")):
        make_stream(cfg)


def test_the_cache_is_written_file_by_file_with_the_same_contents(tmp_path, monkeypatch):
    """Building used to hold every file and then their concatenation (twice the corpus); now
    one buffer. The contents are tokenize_files' bytes whatever the buffer's size (here also
    7 bytes: files split across writes, NULs inside files, an empty file)."""
    big = [tmp_path / "big" / f"{i}.txt" for i in range(4)]
    big[0].parent.mkdir()
    for i, f in enumerate(big):
        f.write_bytes(bytes([65 + i]) * (8 << 20))  # 32 MiB in all
    tracemalloc.start()
    try:
        array = store.open_tokens(big, tmp_path / "cache")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 24 << 20, peak  # was 64 MiB
    assert array.shape == (4 * ((8 << 20) + 1),)
    np.testing.assert_array_equal(array[(8 << 20) - 2:(8 << 20) + 3].read().result(),
                                  [65, 65, 0, 66, 66])
    small = [tmp_path / name for name in ("a", "b", "c", "d")]
    for f, data in zip(small, (b"hello\0world", b"", b"x" * 20, b"\0")):
        f.write_bytes(data)
    monkeypatch.setattr(store, "_BUFFER", 7)
    array = store.open_tokens(small, tmp_path / "cache")
    assert bytes(array.read().result()) == bytes(store.tokenize_files(small)) \
        == b"hello\0world\0" + b"\0" + b"x" * 20 + b"\0" + b"\0\0"


def test_a_cache_inside_the_glob_is_not_read_as_text(tmp_path):
    """`data.path=DIR/**/*` with `data.cache_dir=DIR/cache`: the cache's chunk files joined the
    corpus, whose fingerprint, so cache, changed on every run (and the model read compressed
    chunks as text)."""
    for i in range(30):
        (tmp_path / f"f{i}.txt").write_text("y" * 100 + str(i))
    (tmp_path / "link").symlink_to(tmp_path / "cache")  # the cache again, by another name
    cfg = tiny_config(f"data.path={tmp_path}/**/*", f"data.cache_dir={tmp_path}/cache")
    for _ in range(2):
        stream = make_stream(cfg)
        assert stream.num_files["train"] + stream.num_files["valid"] == 30
    assert len(list((tmp_path / "cache").iterdir())) == 2
    with pytest.raises(ConfigError, match=r"matched no files besides the token cache's own "
                                          rf"files under '{re.escape(str(tmp_path / 'cache'))}'"):
        make_stream(tiny_config(f"data.path={tmp_path}/cache/**/*",
                                f"data.cache_dir={tmp_path}/cache"))


def test_glob_matching_nothing_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="matched no files"):
        make_stream(tiny_config(f"data.path={tmp_path}/*.none"))


def test_mqar_answers_are_the_values_of_queried_keys():
    rng = np.random.default_rng(0)
    b = synthetic.mqar(rng, 16, 64, 512, 8)
    assert b["inputs"].shape == (16, 64)
    for row in range(16):
        inputs, targets, mask = b["inputs"][row], b["targets"][row], b["mask"][row]
        table = dict(zip(inputs[0:16:2], inputs[1:16:2]))
        answers = np.nonzero(mask)[0]
        assert len(answers) == 8
        for pos in answers:
            assert targets[pos] == table[inputs[pos]]
    again = synthetic.mqar(np.random.default_rng(0), 16, 64, 512, 8)
    np.testing.assert_array_equal(b["inputs"], again["inputs"])


def test_mqar_checks_its_arguments_and_a_batch_of_0_is_empty():
    """As the other generators: num_kv_pairs=0 gave examples with no answer, -1 a numpy error,
    batch 0 'need at least one array to stack'."""
    rng = np.random.default_rng(0)
    for args, message in [((2, 16, 64, 0), r"num_kv_pairs=0 must be >= 1"),
                          ((2, 16, 64, -1), r"num_kv_pairs=-1 must be >= 1"),
                          ((-1, 16, 64, 2), r"mqar: batch=-1 must be an integer >= 0"),
                          ((2, 16, 5, 2), r"vocab_size=5 too small for num_kv_pairs=2"),
                          ((2, 6, 64, 2), r"seq_len=6 too short for num_kv_pairs=2 \(need >= 7\)")]:
        with pytest.raises(ValueError, match=message):
            synthetic.mqar(rng, *args)
    with pytest.raises(ValueError, match=r"num_kv_pairs=0 must be >= 1"):
        synthetic.check_mqar(16, 64, 0)
    synthetic.check_mqar(7, 6, 2)  # the smallest sizes
    empty = synthetic.mqar(rng, 0, 16, 64, 2)
    assert {k: (v.shape, v.dtype) for k, v in empty.items()} == {
        "inputs": ((0, 16), np.int32), "targets": ((0, 16), np.int32),
        "mask": ((0, 16), np.float32)}
    for generator, args in ((synthetic.selective_copying, (40, 10, 8)),
                            (synthetic.induction_heads, (40, 50, 10)),
                            (synthetic.multi_hop, (60, 64, 3, 3))):
        assert generator(rng, 0, *args)["inputs"].shape == (0, 40 if args[0] == 40 else 60)
        with pytest.raises(ValueError, match=r"batch=-1 must be an integer >= 0"):
            generator(rng, -1, *args)


def test_selective_copying_asks_for_the_data_tokens_in_order():
    b = synthetic.selective_copying(np.random.default_rng(1), 4, 40, 10, 8)
    for row in range(4):
        inputs, targets, mask = b["inputs"][row], b["targets"][row], b["mask"][row]
        region = 40 - 8
        data = inputs[:region][inputs[:region] > 1]
        np.testing.assert_array_equal(targets[mask == 1], data)
        assert inputs[region] == 1  # separator
    with pytest.raises(ValueError, match="too short"):
        synthetic.selective_copying(np.random.default_rng(0), 1, 10, 10, 8)


def test_induction_heads_score_only_what_a_lookup_predicts_and_no_fixed_lag_does():
    """Every scored target is the successor of the input token's previous occurrence (a unique
    one: the prefix's tokens are distinct); the first target of the repeat, whose input has
    not occurred before, is not scored; rows draw their own periods, so no copy at a fixed lag
    is right on most rows (with one period for all rows, the lag-16 copy scored 100%)."""
    rows, length, vocab, prefix = 200, 64, 256, 16
    b = synthetic.induction_heads(np.random.default_rng(2), rows, length, vocab, prefix)
    lookup_right, scored = 0, 0
    lag_right = np.zeros(prefix + 1)
    for inputs, targets, mask in zip(b["inputs"], b["targets"], b["mask"]):
        first = int(np.argmax(mask))
        assert mask[first:].min() == 1 and mask[:first].max(initial=0) == 0
        assert len(set(inputs[:first].tolist())) == first  # one period of distinct tokens
        assert prefix // 2 + 1 <= first <= prefix
        for i in range(length):
            seen = np.flatnonzero(inputs[:i] == inputs[i])
            assert bool(mask[i]) == bool(len(seen))  # scored iff the token occurred before
            if mask[i]:
                scored += 1
                lookup_right += targets[i] == inputs[seen[-1] + 1]
                for lag in range(1, prefix + 1):
                    lag_right[lag] += i + 1 - lag >= 0 and targets[i] == inputs[i + 1 - lag]
    assert lookup_right == scored > 0
    assert lag_right.max() / scored < 0.25, lag_right / scored
    assert 0 < b["inputs"].min() and b["inputs"].max() < vocab
    with pytest.raises(ValueError, match="vocab_size=10 too small for prefix_len=16"):
        synthetic.induction_heads(np.random.default_rng(0), 1, 64, 10, 16)


@pytest.mark.parametrize("hops", [1, 3])
def test_multi_hop_answers_follow_every_chain_to_its_value(hops):
    batch = synthetic.multi_hop(np.random.default_rng(hops), 4, 60, 64, hops, 3)
    seq = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    for b in range(4):
        statements = seq[b, :2 * hops * 3].reshape(-1, 2)
        binding = dict(statements)  # variable -> what it is assigned
        assert len(binding) == hops * 3  # distinct variables
        answers = np.flatnonzero(batch["mask"][b]) + 1  # answer positions in seq
        assert len(answers) == 3
        for pos in answers:
            assert seq[b, pos - 2] == synthetic.QUERY
            name, depth = seq[b, pos - 1], 0
            while name in binding:  # resolve the chain
                name, depth = binding[name], depth + 1
            assert depth == hops and name == seq[b, pos] and name >= 32
    with pytest.raises(ValueError, match="seq_len=10 too short for hops=3, chains=3"):
        synthetic.multi_hop(np.random.default_rng(0), 1, 10, 64, 3, 3)
    with pytest.raises(ValueError, match="vocab_size=16 too small"):
        synthetic.multi_hop(np.random.default_rng(0), 1, 60, 16, 3, 3)


def test_synthetic_stream_is_deterministic_and_eval_differs():
    cfg = tiny_config("data.task=mqar", "model.vocab_size=128", "data.num_kv_pairs=4")
    s1, s2 = make_stream(cfg), make_stream(cfg)
    np.testing.assert_array_equal(s1.batch(9)["inputs"], s2.batch(9)["inputs"])
    assert not np.array_equal(s1.batch(0)["inputs"], s1.eval_batch(0, 1)["inputs"])


def test_mqar_random_filler_keeps_the_pairs_and_queries_and_fills_the_rest():
    zero = synthetic.mqar(np.random.default_rng(1), 8, 128, 256, 8)
    rand = synthetic.mqar(np.random.default_rng(1), 8, 128, 256, 8, filler="random")
    np.testing.assert_array_equal(zero["mask"], rand["mask"])
    kept = zero["inputs"] != 0                     # pairs and queries: identical in both
    np.testing.assert_array_equal(rand["inputs"][kept], zero["inputs"][kept])
    answers = rand["mask"] > 0
    np.testing.assert_array_equal(rand["targets"][answers], zero["targets"][answers])
    filled = rand["inputs"][~kept]
    assert filled.size > 500 and len(np.unique(filled)) > 100  # spread over the vocabulary
    with pytest.raises(ValueError, match=r"filler='noise': allowed 'zero' or 'random'"):
        synthetic.mqar(np.random.default_rng(1), 2, 64, 256, 4, filler="noise")
    with pytest.raises(ConfigError, match=r"data.mqar_filler='noise'"):
        validate(apply_overrides(configs.get("mqar_tiny"), ["data.mqar_filler=noise"]))


def test_mqar_sizes_that_cannot_hold_the_pairs_are_refused_before_training():
    tiny = configs.get("mqar_tiny")
    with pytest.raises(ConfigError, match=r"model.vocab_size=64 too small for "
                                          r"data.num_kv_pairs=32: MQAR needs >= .* = 66"):
        validate(apply_overrides(tiny, ["model.vocab_size=64", "data.num_kv_pairs=32"]))
    with pytest.raises(ConfigError, match=r"data.seq_len=16 too short for data.num_kv_pairs=8"):
        validate(apply_overrides(tiny, ["data.seq_len=16", "data.num_kv_pairs=8"]))
    with pytest.raises(ConfigError, match=r"data.num_kv_pairs=0: must be >= 1"):
        validate(apply_overrides(tiny, ["data.num_kv_pairs=0"]))
    with pytest.raises(ValueError, match=r"need >= 2 \* num_kv_pairs \+ 2 = 66"):
        synthetic.mqar(np.random.default_rng(1), 2, 256, 64, 32)
    validate(apply_overrides(tiny, ["model.vocab_size=66", "data.num_kv_pairs=32",
                                    "data.seq_len=127", "model.max_seq_len=127"]))
