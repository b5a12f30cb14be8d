"""Data preparation at scale, scaled down (a review of a 1.5 GB corpus and 50,000 files): memory that grew with a
Parquet file's size, a download-count request per JSON file, and what input resolving excludes."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from relora_ds.data import inputs, sources


def test_parquet_utf8_check_holds_one_row_group_not_the_file(tmp_path):
    # The UTF-8 check reads every Parquet file's text column; it held each column chunk read until the file was
    # done (pyarrow's pre_buffer), so a 613 MB file took 582 MB. Here: 40 row groups of ~256 KB of text, stored
    # uncompressed as real corpora nearly are (held chunks are the compressed pages).
    path = tmp_path / "shard.parquet"
    row_group = [f"{i:06d} " + "word " * 200 for i in range(256)]
    with pq.ParquetWriter(path, pa.schema([("text", pa.string())]), compression="none") as w:
        for _ in range(40):
            w.write_table(pa.table({"text": row_group}))
    group_bytes = sum(map(len, row_group))
    pool = pa.default_memory_pool()
    base, held, rows = pool.bytes_allocated(), 0, 0
    for batch in sources._record_batches(str(path), ["text"]):
        rows += batch.num_rows
        held = max(held, pool.bytes_allocated() - base)
        del batch
    assert rows == 40 * 256
    assert held < 10 * group_bytes, f"{held} bytes held while reading, one row group is {group_bytes}"
    assert sources._invalid_utf8_column(str(path), "text") is None  # clean: nothing to repair


def test_excluding_outputs_as_strings_excludes_what_the_paths_did(tmp_path):
    # resolve_inputs checks each file found against prepare's ~12 own paths; Path.parents made that ~20x a
    # realpath per file (17 s of 50,000 files; 4.1 s as string prefixes: measured, not a timed test here).
    out = tmp_path / "out"
    exclude = tuple((out / name).resolve() for name in ("manifest.json", "tokenizer.model", ".work", "train.bin"))
    files = [tmp_path / "a.txt"]
    files[0].write_text("x")
    # what is excluded is unchanged: the paths themselves, what lies under them, reached through a link too
    (out / ".work" / "hf").mkdir(parents=True)
    (out / ".work" / "hf" / "a.txt").write_text("x")
    (tmp_path / "link").symlink_to(out)
    assert inputs._excluded(out / "train.bin", exclude)
    assert inputs._excluded(out / ".work" / "hf" / "a.txt", exclude)
    assert inputs._excluded(tmp_path / "link" / ".work" / "hf" / "a.txt", exclude)
    assert not inputs._excluded(out / "train.bin.txt", exclude)
    assert not inputs._excluded(out / ".workers" / "a.txt", exclude)
    assert not inputs._excluded(Path(files[0]), exclude)


def test_local_files_send_no_download_count_requests(tmp_path, monkeypatch):
    # Each JSON file is loaded alone, and datasets sent an HTTP HEAD (a download count) per load_dataset call:
    # 51 of 54 s of 600 small .jsonl files went to them on this offline machine.
    import datasets.load

    requests = []

    class Session:
        def head(self, url, **kwargs):
            requests.append(url)

    monkeypatch.setattr(datasets.load, "get_session", Session)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    for i in range(3):
        (tmp_path / f"{i}.jsonl").write_text(f'{{"text": "document {i}"}}\n')
    files = sorted(str(p) for p in tmp_path.glob("*.jsonl"))
    corpus = sources.load_corpus((files, None), work_dir=tmp_path / "work")
    assert corpus.dataset["text"] == ["document 0", "document 1", "document 2"]
    assert requests == []
