"""`herd serve` through the official openai client on a live loopback server: the server's greedy answer
is token for token herd's own generate() (text, image, video, audio), streamed text concatenates to the
non-streamed answer, and inputs a model lacks are refused with a 400 naming the encoder."""

import openai
import pytest
from serve_workspace import (
    data_url,
    mp4_bytes,
    png_bytes,
    wav_bytes,
    write_serve_workspace,
    write_video_model,
)

from herd.serving.engine import Part, ServedModel, Turn
from herd.serving.server import ServeOptions, running
from herd.text.generation import SamplingParams, generate

MAX_NEW = 12


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return write_serve_workspace(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def text_server(root):
    served = ServedModel.load(root / "llm")
    with running(served, ServeOptions(port=0)) as url:
        yield served, openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(client, content, **kw):
    kw = {"extra_body": {"return_token_ids": True}, "temperature": 0, "max_tokens": MAX_NEW, **kw}
    model = client.models.list().data[0].id
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}], **kw)


def streamed(client, content):
    stream = client.chat.completions.create(
        model=client.models.list().data[0].id, messages=[{"role": "user", "content": content}], max_tokens=MAX_NEW,
        temperature=0, stream=True,
    )  # fmt: skip
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def reference(served, turns, run):
    """herd's own answer: the prompt the server builds, decoded by `run(prompt, params, stop_ids)`."""
    job = served.job(turns, SamplingParams(MAX_NEW, 0.0))
    completion = run(job.prompt, SamplingParams(MAX_NEW, 0.0), served.stop_ids)
    return job.prompt, completion.tokens


@pytest.mark.parametrize("question", ["Say hi.", "Count: one two three", "What color is the square?"])
def test_text_greedy_equals_generate_streamed_or_not(text_server, question):
    served, client = text_server
    turns = [Turn("user", [Part("text", "q", text=question)])]
    prompt, want = reference(
        served,
        turns,
        lambda p, s, stop: generate(served.model, [p], s, stop, vocab_limit=served.vocab_limit)[0],
    )
    resp = ask(client, question)
    choice = resp.choices[0]
    assert resp.prompt_token_ids == prompt
    assert choice.token_ids == want and len(want) >= 3, (choice.token_ids, want)
    assert choice.message.content == served.tokenizer.decode(want)
    assert resp.usage.completion_tokens == len(want) and resp.usage.prompt_tokens == len(prompt)
    assert choice.finish_reason == ("length" if len(want) == MAX_NEW else "stop")
    assert streamed(client, question) == choice.message.content


def test_image_answer_equals_generate_with_images(root):
    from herd.adapters.multimodal import generate_with_images
    from herd.ask import VisionQA

    served = ServedModel.load(root / "image_model")
    qa = VisionQA(served.model, served.tokenizer, served.config["max_tiles"])
    png = png_bytes(3)
    from herd.serving.media import decode_image

    def run(prompt, params, stop):
        from herd.vision.tiling import collate_images

        batch = collate_images([qa.transform(decode_image(png, "test"))], max_images_per_sample=1)
        xmask = batch["aspect_ratio_mask"][:, None].expand(-1, len(prompt), -1, -1).clone()
        return generate_with_images(served.model, [prompt], batch["pixel_values"], batch["aspect_ratio_ids"],
                                    batch["aspect_ratio_mask"], xmask, params, stop_ids=stop,
                                    vocab_limit=served.vocab_limit)[0]  # fmt: skip

    parts = [Part("image", "i", data=png), Part("text", "q", text="What color is the square?")]
    prompt, want = reference(served, [Turn("user", parts)], run)
    assert served.llm.args.vocab_size in prompt  # the <|image|> token
    content = [{"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
               {"type": "text", "text": "What color is the square?"}]  # fmt: skip
    with running(served, ServeOptions(port=0)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        resp = ask(client, content)
        assert resp.choices[0].token_ids == want and len(want) >= 3
        assert streamed(client, content) == resp.choices[0].message.content
    # the image path is live (gates open): another image, other next-token logits
    logits = [served.job([Turn("user", [Part("image", "i", data=png_bytes(s)), parts[1]])], SamplingParams(4))
              .prefill(len(prompt) + 4)[1] for s in (3, 9)]  # fmt: skip
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_audio_answer_equals_generate_with_audio(root):
    import base64

    from herd.adapters.speech_llama import generate_with_audio
    from herd.speech.features import pad_features

    served = ServedModel.load(root / "speech_model")
    wav = wav_bytes(0.6)
    parts = [Part("text", "q", text="Repeat after me in English:"), Part("audio", "a", data=wav, fmt="wav")]

    def run(prompt, params, stop):
        from herd.serving.media import decode_audio

        feats, lengths, _ = pad_features([served._features(decode_audio(wav, "wav", "a", 60.0))])
        return generate_with_audio(served.model, [prompt], feats, lengths, params, stop_ids=stop,
                                   vocab_limit=served.vocab_limit)[0]  # fmt: skip

    prompt, want = reference(served, [Turn("user", parts)], run)
    assert prompt.count(served.model.audio_token_id) == served.model.audio_tokens_for_samples(9600) > 0
    content = [{"type": "text", "text": "Repeat after me in English:"},
               {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}]  # fmt: skip
    with running(served, ServeOptions(port=0)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        resp = ask(client, content)
        assert resp.choices[0].token_ids == want and len(want) >= 3
        assert streamed(client, content) == resp.choices[0].message.content


def test_video_answer_equals_generate_with_images(root, tmp_path):
    from herd.adapters.multimodal import generate_with_images
    from herd.serving.media import decode_video
    from herd.vision.video import collate_videos, video_tiles

    served = ServedModel.load(write_video_model(root))
    assert served.describe()["modalities"] == ["image", "video"] and served.num_frames == 4
    mp4 = mp4_bytes(tmp_path)

    def run(prompt, params, stop):
        inputs = collate_videos([video_tiles(decode_video(mp4, served.num_frames, "v"), served.transform)], 4)
        return generate_with_images(
            served.model, [prompt], params=params, stop_ids=stop, vocab_limit=served.vocab_limit, **inputs
        )[0]

    question = "Is the red square going left or right?"
    parts = [Part("video", "v", data=mp4), Part("text", "q", text=question)]
    prompt, want = reference(served, [Turn("user", parts)], run)
    assert served.llm.args.vocab_size + 1 in prompt  # the <|video|> token
    content = [{"type": "video_url", "video_url": {"url": data_url(mp4, "video/mp4")}},
               {"type": "text", "text": question}]  # fmt: skip
    with running(served, ServeOptions(port=0)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        resp = ask(client, content)
        assert resp.choices[0].token_ids == want and len(want) >= 3
        assert streamed(client, content) == resp.choices[0].message.content
    # the video path is live: other frames, other next-token logits
    other = mp4_bytes(tmp_path, num_frames=12)
    logits = [served.job([Turn("user", [Part("video", "v", data=clip), parts[1]])], SamplingParams(4))
              .prefill(len(prompt) + 4)[1] for clip in (mp4, other)]  # fmt: skip
    assert (logits[0] - logits[1]).abs().max() > 1e-4


def test_adapters_are_prompted_as_herd_ask_prompts_them(root):
    """An adapter checkpoint is served with the plain prompts its task trained on (`prompt_format` auto):
    a one-turn request is `herd ask`'s prompt token for token and gets `herd ask`'s answer; a follow-up
    carries the earlier reply; `--prompt-format chat` gives the chat format instead."""
    import base64

    from herd.ask import SpeechQA, VisionQA
    from herd.serving.media import decode_audio, decode_image
    from herd.tasks.vision import qa_prompt

    question, png = "What color is the square?", png_bytes(5)
    served = ServedModel.load(root / "image_model")
    assert served.prompt_format == "plain" and ServedModel.load(root / "llm").prompt_format == "chat"
    tok = served.tokenizer
    turns = [Turn("user", [Part("text", "q", text=question), Part("image", "i", data=png)])]  # text first
    want = [tok.bos_id, served.llm.args.vocab_size, *tok.encode(qa_prompt(question))]
    assert served.job(turns, SamplingParams(4)).prompt == want
    follow = [
        *turns,
        Turn("assistant", [Part("text", "a", text="red")]),
        Turn("user", [Part("text", "q2", text="Say hi.")]),
    ]
    assert served.job(follow, SamplingParams(4)).prompt == want + tok.encode(" red") + tok.encode(
        " " + qa_prompt("Say hi.")
    )
    system = [Turn("system", [Part("text", "s", text="Be brief.")]), *turns]
    assert served.job(system, SamplingParams(4)).prompt == want  # no adapter task trains with a system turn
    content = [
        {"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
        {"type": "text", "text": question},
    ]
    with running(served, ServeOptions(port=0)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        answer = ask(client, content).choices[0].message.content
    qa = VisionQA.load(root / "image_model")
    assert answer == qa.ask([decode_image(png, "i")], [question], MAX_NEW)[0] and answer

    speech = ServedModel.load(root / "speech_model")
    wav = wav_bytes(0.5)
    sqa = SpeechQA.load(root / "speech_model")
    parts = [Part("text", "q", text=sqa.transcribe_prompt()), Part("audio", "a", data=wav, fmt="wav")]
    clip = decode_audio(wav, "wav", "a", 60.0)
    n = speech.model.audio_tokens(speech._features(clip).shape[0])
    want = [tok.bos_id, *tok.encode(sqa.transcribe_prompt()), *[speech.model.audio_token_id] * n]
    assert speech.job([Turn("user", parts)], SamplingParams(4)).prompt == want
    audio = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    with running(speech, ServeOptions(port=0)) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        answer = (
            ask(client, [{"type": "text", "text": sqa.transcribe_prompt()}, audio]).choices[0].message.content
        )
    assert answer == sqa.ask([clip], [sqa.transcribe_prompt()], MAX_NEW)[0]

    chat = ServedModel.load(root / "image_model", prompt_format="chat")
    assert (
        chat.job(turns, SamplingParams(4)).prompt[:2] == [tok.bos_id, *chat.format.encode_header("user")][:2]
    )
    assert chat.job(turns, SamplingParams(4)).prompt[-len(chat.format.encode_header("assistant")):] == (
        chat.format.encode_header("assistant"))  # fmt: skip


def test_inputs_the_model_lacks_are_400(text_server):
    _, client = text_server
    image = [{"type": "image_url", "image_url": {"url": data_url(png_bytes(), "image/png")}}]
    audio = [{"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}}]
    video = [{"type": "video_url", "video_url": {"url": "data:video/mp4;base64,AAAA"}}]
    for content, kind in ((image, "image"), (audio, "audio"), (video, "video")):
        with pytest.raises(openai.BadRequestError) as e:
            ask(client, content)
        assert e.value.status_code == 400 and f"this model has no {kind} encoder" in str(e.value)


def test_models_health_and_sampling_options(text_server):
    served, client = text_server
    models = client.models.list().data
    assert [m.id for m in models] == [served.name] and models[0].max_model_len == 256
    # a seeded sample is reproducible and equals generate() with the same seed
    kw = {"temperature": 0.9, "top_p": 0.8, "seed": 7, "extra_body": {"return_token_ids": True}}
    a, b = ask(client, "Say hi.", **kw), ask(client, "Say hi.", **kw)
    job = served.job([Turn("user", [Part("text", "q", text="Say hi.")])], SamplingParams(MAX_NEW))
    want = generate(served.model, [job.prompt], SamplingParams(MAX_NEW, 0.9, 0.8, 7), served.stop_ids,
                    vocab_limit=served.vocab_limit)[0].tokens  # fmt: skip
    assert a.choices[0].token_ids == b.choices[0].token_ids == want
    # a stop string ends the reply before it
    full = ask(client, "Count: one two three").choices[0].message.content
    if len(full) > 4:
        cut = full[2:4]
        stopped = ask(client, "Count: one two three", stop=[cut]).choices[0]
        assert stopped.message.content == full[: full.index(cut)] and stopped.finish_reason == "stop"
