"""Text data: the installed corpora, users' CSV / JSONL sets, and datasets saved with save_to_disk."""

from __future__ import annotations

import pytest

from applications.bissl.text.corpora import load_task, normalize, shakespeare_text


def test_shakespeare_is_normalised_text():
    t = shakespeare_text(max_chars=5000)
    assert len(t) == 5000
    assert set(t) <= set(" abcdefghijklmnopqrstuvwxyz") and "  " not in t
    assert "shakespeare" in t


def test_orange_tasks_read_from_the_wheel():
    tw = load_task("election_tweets")
    assert tw.classes == ("HillaryClinton", "realDonaldTrump")
    assert len(tw.train_texts) + len(tw.test_texts) == 6444  # every tweet, seeded 80/20 split
    assert abs(len(tw.test_texts) / 6444 - 0.2) < 0.01
    assert not set(tw.train_texts[:200]) & set(tw.test_texts) or len(set(tw.test_texts)) < len(tw.test_texts)
    r8 = load_task("reuters_r8")
    assert r8.num_classes == 8 and len(r8.train_texts) == 5485 and len(r8.test_texts) == 2189
    assert all(t == normalize(t) for t in r8.train_texts[:50])


def test_user_csv_and_jsonl(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "train.csv").write_text('text,label\n"Hello, World!",pos\nbad news,neg\nok,pos\n')
    (d / "test.jsonl").write_text('{"text": "hello", "label": "neg"}\n')
    t = load_task("file:mine", tmp_path)
    assert t.classes == ("neg", "pos")
    assert t.train_texts == ("hello world", "bad news", "ok") and t.train_labels == (1, 0, 1)
    assert t.test_labels == (0,)
    (d / "test.jsonl").write_text('{"text": "hello", "label": "maybe"}\n')
    with pytest.raises(ValueError, match="never occur in the training split"):
        load_task("file:mine", tmp_path)


def test_glue_style_dataset_from_disk(tmp_path):
    datasets = pytest.importorskip("datasets")
    feats = datasets.Features(
        {"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["negative", "positive"])}
    )
    dd = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(
            {"sentence": ["a fine film", "dull", "great"], "label": [1, 0, 1]}, features=feats
        ),
        validation=datasets.Dataset.from_dict({"sentence": ["boring"], "label": [0]}, features=feats),
    )
    dd.save_to_disk(str(tmp_path / "sst2"))
    t = load_task("hf:sst2", tmp_path, text_column="sentence")
    assert t.classes == ("negative", "positive") and t.train_labels == (1, 0, 1) and t.test_texts == ("boring",)
    with pytest.raises(ValueError, match="--text-column"):
        load_task("hf:sst2", tmp_path)
