"""The audio dataset, from a manifest or tar shards: bad records skipped and counted by reason, the same
samples from both formats, sharding, resuming."""

import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf
import torch
from speech_inputs import write_bad_audio_files

from herd.data.records import NoUsableRecords
from herd.data.synthetic.tones import write_tone_manifest
from herd.data.training.audio import AudioDataset, write_audio_tar_shards


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


def _write_tar(path, members):
    """A tar shard holding `members` ({name: bytes}) in order."""
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _same_samples(a, b):
    assert [s["key"] for s in a] == [s["key"] for s in b]
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and x["seed"] == y["seed"], x["key"]
        assert {k: v for k, v in x.items() if k != "audio"} == {k: v for k, v in y.items() if k != "audio"}
        assert torch.equal(x["audio"], y["audio"]), x["key"]


def test_tar_shards_yield_the_manifests_samples(tmp_path):
    manifest = write_tone_manifest(tmp_path, 7, seed=2)
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    # text fields and ids ride along; a FLAC clip keeps its extension in the shard
    sf.write(str(tmp_path / "clips/flac.flac"), sf.read(str(tmp_path / "clips/000003.wav"))[0], 16000)
    records[3]["audio"] = "clips/flac.flac"
    for i, rec in enumerate(records):
        rec["text"] = f"utterance {i}"
    records[1]["id"] = "utt-one"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    shards = write_audio_tar_shards(manifest, tmp_path / "shards", samples_per_shard=3)
    assert [p.name for p in shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    with tarfile.open(shards[1]) as tf:
        assert tf.getnames() == [f"00000000{i}.{ext}" for i, e in ((3, "flac"), (4, "wav"), (5, "wav"))
                                 for ext in (e, "json")]  # fmt: skip
    from_jsonl = list(AudioDataset.from_jsonl(manifest, shuffle=False, loop=False))
    assert [s["key"] for s in from_jsonl][:3] == ["clips/000000.wav", "utt-one", "clips/000002.wav"]
    assert from_jsonl[2]["text"] == "utterance 2" and isinstance(from_jsonl[2]["duration"], float)
    _same_samples(
        list(AudioDataset.from_tar_shards(tmp_path / "shards", shuffle=False, loop=False)), from_jsonl
    )
    # shuffled too, and every form of `paths`: a folder, a glob, a list of shards (any order)
    shuffled = list(AudioDataset.from_jsonl(manifest, seed=5, loop=False))
    for paths in (tmp_path / "shards", str(tmp_path / "shards" / "shard-*.tar"), shards[::-1]):
        _same_samples(list(AudioDataset.from_tar_shards(paths, seed=5, loop=False)), shuffled)


def test_bad_shard_members_and_shards_are_skipped_and_counted_by_reason(tmp_path):
    bad = write_bad_audio_files(tmp_path / "bad")  # {"bad/garbage.wav": "not_audio", ...}
    tone = tmp_path / "tone.wav"
    sf.write(str(tone), np.sin(np.arange(16000) / 7).astype(np.float32) * 0.5, 16000)
    good = tone.read_bytes()
    members = {"good.wav": good, "good.txt": b"a transcript"}
    for rel, reason in bad.items():
        if reason != "missing_file":  # a member cannot be missing
            members[f"{reason}.wav"] = (tmp_path / rel).read_bytes()
    members |= {"noaudio.bin": good, "noaudio.json": b'{"text": "no audio member"}',
                "longfield.wav": good, "longfield.json": b'{"duration": 99.0}'}  # fmt: skip
    shards = tmp_path / "shards"
    shards.mkdir()
    _write_tar(shards / "a.tar", members)
    cut = _write_tar(shards / "b.tar", {f"{k}.wav": good for k in ("cut0", "cut1", "cut2")})
    with tarfile.open(cut) as tf:
        middle = tf.getmember("cut2.wav").offset_data + len(good) // 2
    cut.write_bytes(cut.read_bytes()[:middle])  # an interrupted copy: cut inside cut2's audio
    (shards / "c.tar").write_bytes(b"not a tar at all" * 64)
    data = AudioDataset.from_tar_shards(shards, max_seconds=2.0, shuffle=False, loop=False)
    # indexing: a sample without an audio member, a duration field over the limit, a cut or foreign shard
    assert dict(data.skipped.counts) == {"no_audio": 1, "too_long": 1, "truncated_shard": 1,
                                         "unreadable_shard": 1}  # fmt: skip
    assert [r.key for r in data.records] == ["good", "not_audio", "empty_file", "empty_audio", "too_long",
                                             "too_short", "cut0", "cut1"]  # fmt: skip
    data.skipped.max_examples = 20
    samples = list(data)
    assert len(samples) == len(data.records)  # one sample per round: bad members are replaced
    assert {s["key"] for s in samples} == {"good", "cut0", "cut1"}
    assert samples[0]["text"] == "a transcript" and torch.equal(samples[0]["audio"], samples[-1]["audio"])
    expected = {"no_audio": 1, "too_long": 2, "truncated_shard": 1, "unreadable_shard": 1, "not_audio": 1,
                "empty_file": 1, "empty_audio": 1, "too_short": 1}  # fmt: skip
    assert dict(data.skipped.counts) == expected
    # decoding errors name the shard and the sample
    for reason in ("not_audio", "empty_file", "empty_audio", "too_long"):
        where = f"{shards / 'a.tar'}#{reason}: {shards / 'a.tar'}#{reason}: "
        assert any(e.startswith(where) for e in data.skipped.examples), (reason, data.skipped.examples)
    # a shard deleted after indexing: its samples are missing, not a crash
    again = AudioDataset.from_tar_shards(shards / "b.tar", shuffle=False, loop=False)
    cut.unlink()
    with pytest.raises(NoUsableRecords, match="missing_file 2"):
        list(again)


def test_ranks_and_resumption_on_tar_shards_match_the_manifest(tmp_path):
    manifest = write_tone_manifest(tmp_path, 10, seed=1)
    write_audio_tar_shards(manifest, tmp_path / "shards", samples_per_shard=4)
    for rank in range(2):
        kw = {"rank": rank, "world_size": 2, "seed": 3, "loop": False}
        shard_keys = [s["key"] for s in AudioDataset.from_tar_shards(tmp_path / "shards", **kw)]
        assert shard_keys == [s["key"] for s in AudioDataset.from_jsonl(manifest, **kw)]
        assert len(shard_keys) == 5
    # the state is the same for both formats: a run can even resume from shards onto the manifest
    stream = AudioDataset.from_tar_shards(tmp_path / "shards", seed=3)
    it = iter(stream)
    for _ in range(7):
        next(it)
    state, rest = stream.state_dict(), [next(it)["key"] for _ in range(6)]
    resumed = AudioDataset.from_jsonl(manifest, seed=3)
    resumed.load_state_dict(state)
    it2 = iter(resumed)
    assert [next(it2)["key"] for _ in range(6)] == rest
