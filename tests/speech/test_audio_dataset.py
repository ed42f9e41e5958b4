"""The audio manifest dataset: bad records skipped and counted by reason, sharding, resuming."""

import json

import pytest
import torch
from speech_inputs import write_bad_audio_files

from herd.data.records import NoUsableRecords
from herd.data.synthetic.tones import write_tone_manifest
from herd.data.training.audio import AudioDataset


@pytest.fixture(scope="module")
def manifest_with_bad_records(tmp_path_factory):
    root = tmp_path_factory.mktemp("audio")
    good = write_tone_manifest(root, 6, seed=0)
    lines = good.read_text().splitlines()
    bad = write_bad_audio_files(root / "bad")
    lines += [json.dumps({"audio": path, "id": f"bad-{reason}"}) for path, reason in bad.items()]
    lines += ['{"audio": "clips/000000.wav"', '["a list"]', json.dumps({"text": "no audio"}),
              json.dumps({"audio": "clips/000001.wav", "duration": 999.0})]  # fmt: skip
    path = root / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, bad


def test_bad_records_are_skipped_and_counted_by_reason(manifest_with_bad_records):
    path, bad = manifest_with_bad_records
    data = AudioDataset.from_jsonl(path, max_seconds=2.0, loop=False, shuffle=False)
    # indexing already skips what the manifest shows: bad JSON, a non-object, no audio, a long duration
    assert dict(data.skipped.counts) == {
        "bad_json": 1,
        "not_an_object": 1,
        "no_audio_field": 1,
        "too_long": 1,
    }
    samples = list(data)
    assert len(samples) == len(data) == 6 + len(bad)  # one sample per round: bad files are replaced
    assert {s["key"] for s in samples} <= {f"clips/{i:06d}.wav" for i in range(6)}
    expected = {"bad_json": 1, "not_an_object": 1, "no_audio_field": 1, "too_long": 2, "not_audio": 1,
                "empty_file": 1, "empty_audio": 1, "too_short": 1, "missing_file": 1}  # fmt: skip
    assert dict(data.skipped.counts) == expected
    assert all(s["audio"].dtype == torch.float32 and s["audio"].numel() >= 12800 for s in samples)
    assert "skipped 10 record(s)" in data.skipped.summary()


def test_nothing_usable_left_is_an_error_with_the_counts(tmp_path):
    bad = write_bad_audio_files(tmp_path / "bad")
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text("\n".join(json.dumps({"audio": p}) for p in bad) + "\n")
    data = AudioDataset.from_jsonl(manifest, max_seconds=2.0)
    with pytest.raises(NoUsableRecords, match=r"no readable audio file .*not_audio 1"):
        next(iter(data))
    (tmp_path / "none.jsonl").write_text('{"text": "no audio"}\n')
    with pytest.raises(NoUsableRecords, match="no_audio_field 1"):
        AudioDataset.from_jsonl(tmp_path / "none.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl: audio manifest not found"):
        AudioDataset.from_jsonl(tmp_path / "missing.jsonl")


def test_ranks_share_an_epoch_and_a_resumed_stream_continues(tmp_path):
    manifest = write_tone_manifest(tmp_path, 10, seed=1)
    ranks = [AudioDataset.from_jsonl(manifest, rank=r, world_size=2, seed=3, loop=False) for r in range(2)]
    keys = [[s["key"] for s in d] for d in ranks]
    assert len(keys[0]) == len(keys[1]) == 5 and not set(keys[0]) & set(keys[1])
    single = [s["key"] for s in AudioDataset.from_jsonl(manifest, seed=3, loop=False)]
    assert single[0::2] == keys[0] and single[1::2] == keys[1]  # rank r takes every world-th record
    # per-sample seeds depend on (seed, epoch, record), not on the layout
    seeds_single = {s["key"]: s["seed"] for s in AudioDataset.from_jsonl(manifest, seed=3, loop=False)}
    seeds_rank0 = {
        s["key"]: s["seed"]
        for s in AudioDataset.from_jsonl(manifest, rank=0, world_size=2, seed=3, loop=False)
    }
    assert all(seeds_single[k] == v for k, v in seeds_rank0.items())
    # resume after 7 samples: the rest of the stream is the uninterrupted one's
    stream = AudioDataset.from_jsonl(manifest, seed=3)
    it = iter(stream)
    first = [next(it)["key"] for _ in range(7)]
    state = stream.state_dict()
    rest = [next(it)["key"] for _ in range(8)]
    resumed = AudioDataset.from_jsonl(manifest, seed=3)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [next(it2)["key"] for _ in range(8)] == rest and len(first) == 7
    with pytest.raises(ValueError, match="resuming would change the samples"):
        AudioDataset.from_jsonl(manifest, seed=4).load_state_dict(state)
