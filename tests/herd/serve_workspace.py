"""Checkpoints the server tests load: a tiny text LLM, an image adapter and a speech adapter on it, plus
the media a client would send (a PNG, a WAV) as bytes and data: URLs."""

import base64
import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny_workspaces import SHAPE_QA_WORDS, write_tiny_llm

CHAT_WORDS = (
    *SHAPE_QA_WORDS,
    "system user assistant\n\n Hello! Count: one two three four five six seven eight nine ten. Say hi.",
    "Repeat after me in English: the cat sat on the mat",
)


def write_serve_workspace(root: Path) -> Path:
    """`root/llm` (text), `root/image_model` (tiny encoder, open gates), `root/speech_model`."""
    from herd.adapters.multimodal import MultimodalLlama
    from herd.adapters.multimodal_io import save_multimodal_model
    from herd.adapters.speech import get_speech_adapter_preset
    from herd.adapters.speech_io import save_speech_model
    from herd.adapters.speech_llama import SpeechLlama
    from herd.speech.conformer import ConformerEncoder
    from herd.speech.conformer_args import get_speech_preset
    from herd.text.loading import load_model
    from herd.vision.encoder import VisionEncoder
    from herd.vision.vision_args import get_vision_preset

    write_tiny_llm(root / "llm", list(CHAT_WORDS), 256)
    torch.manual_seed(1)
    encoder = VisionEncoder(get_vision_preset("tiny", max_num_tiles=1, patch_size=7))
    model = MultimodalLlama(load_model(root / "llm"), encoder, cross_attention_layers=[0, 1, 2])
    for block in model.cross_attention.values():  # open gates: the image changes the answer
        torch.nn.init.constant_(block.gate_attn, 0.5)
        torch.nn.init.constant_(block.gate_ffwd, 0.5)
    save_multimodal_model(model, root / "llm", 1, root / "image_model")
    torch.manual_seed(2)
    speech = SpeechLlama(
        load_model(root / "llm"),
        ConformerEncoder(get_speech_preset("tiny")),
        get_speech_adapter_preset("tiny"),
    )
    save_speech_model(speech, root / "llm", root / "speech_model")
    return root


def png_bytes(seed: int = 0, size: int = 56) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def wav_bytes(seconds: float = 0.6, freq: float = 440.0) -> bytes:
    import soundfile

    t = np.arange(int(16000 * seconds)) / 16000
    buf = io.BytesIO()
    soundfile.write(buf, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV")
    return buf.getvalue()


def data_url(data: bytes, media_type: str) -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def write_video_model(root: Path) -> Path:
    """`root/video_model`: `root/image_model` plus a tiny video adapter (4 frames per group, gates open)."""
    from herd.adapters.multimodal_io import load_multimodal_model, save_multimodal_model
    from herd.adapters.perceiver import get_perceiver_preset

    model, _, config = load_multimodal_model(root / "image_model")
    torch.manual_seed(3)
    adapter = model.add_video(
        get_perceiver_preset("tiny", dim=model.llm.args.dim, frames_per_group=4), every=1
    )
    for name, param in adapter.named_parameters():
        if "gate" in name:  # open gates: the video changes the answer
            torch.nn.init.constant_(param, 0.5)
    return save_multimodal_model(model, root / "llm", config["max_tiles"], root / "video_model")


def mp4_bytes(tmp: Path, num_frames: int = 6) -> bytes:
    """A short mp4 of moving squares (H.264, the codec phones and browsers write)."""
    from herd.data.synthetic.videos import write_video

    return write_video(tmp / f"clip{num_frames}.mp4", num_frames, fps=8, width=64, height=48).read_bytes()
