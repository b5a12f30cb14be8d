import pytest


@pytest.fixture(scope="session")
def small_data_dir(tmp_path_factory):
    """The built-in corpus, first 1500 documents, 512-token SentencePiece vocab (prepared once per session)."""
    from relora_ds.data import prepare_data

    out = tmp_path_factory.mktemp("data") / "builtin-512"
    prepare_data(None, out, vocab_size=512, max_docs=1500)
    return out
