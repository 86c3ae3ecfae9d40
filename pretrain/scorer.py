"""A model as curation's scorer: per sample the cosine similarity of its image and caption (CLIP score, as DataComp
filters by) and of its audio and caption, and the normalised embeddings they come from. The model is one of our
releases (image, text and audio towers) or an open_clip weights file with its architecture (image and text only).
Used by ``mmfuse curate scorer=...`` (data_pipeline/curate names this module, it does not import it); torch is
imported on use, so ``scorer_modalities`` checks a scorer before any process starts."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from data_pipeline.config import AudioFeatureConfig, LoaderConfig, MembersConfig

if TYPE_CHECKING:
    import numpy as np

    from data_pipeline.loader.tarstream import RawSample

PAIRS = {"image_text": ("image", "text"), "audio_text": ("audio", "text")}
MODALITIES = ("image", "text", "audio")


def scorer_modalities(url: str, open_clip_model: str = "") -> tuple[str, ...]:
    """What the scorer ``url`` embeds, checked without loading its weights: a ValueError that names the problem
    (not a release, an open_clip file without its architecture, an unknown or unsupported architecture)."""
    from mmfuse.redact import redact
    from mmfuse.storage import filesystem
    from pretrain.model.pretrained import WEIGHT_SUFFIXES, open_clip_architecture
    from pretrain.release import read_release_config

    fs, root = filesystem(url)
    if not root.rstrip("/").endswith(WEIGHT_SUFFIXES) or fs.isdir(root):
        if open_clip_model:
            raise ValueError(f"open_clip_model={open_clip_model!r} is for an open_clip weights file, and scorer="
                             f"{redact(url)!r} is not one ({', '.join(WEIGHT_SUFFIXES)}): drop open_clip_model for a release")
        read_release_config(url, key="scorer")
        return MODALITIES
    if not fs.exists(root):
        raise ValueError(f"scorer={redact(url)!r} does not exist")
    if not open_clip_model:
        raise ValueError(f"scorer={redact(url)!r} is an open_clip weights file: set open_clip_model to its architecture "
                         "(an open_clip model name such as ViT-B-32, or its open_clip_config.json)")
    open_clip_architecture(open_clip_model)
    return ("image", "text")  # open_clip has no audio tower (Scorer embeds the same)


class Scorer:
    """A release or an open_clip checkpoint (``open_clip_model``) scoring raw samples in batches."""

    def __init__(self, path: str, members: MembersConfig, batch_size: int = 64, open_clip_model: str = ""):
        import open_clip

        from data_pipeline.loader.decode import Decoder
        from pretrain.evaluate import embed_rows

        self.modalities = ("image", "text") if open_clip_model else MODALITIES  # checked by scorer_modalities
        if open_clip_model:
            from pretrain.model.pretrained import load_open_clip_model

            self.model, front_end = load_open_clip_model(path, open_clip_model)
        else:
            from pretrain.release import load_release, release_front_end

            self.model, release = load_release(path)
            front_end = release_front_end(release)  # the front end it heard
        self.model.eval()
        self.embed_rows = embed_rows
        mc = self.model.cfg
        audio = dataclasses.replace(AudioFeatureConfig(), **front_end)
        loader_cfg = LoaderConfig(train="-", members=dataclasses.replace(members, task_fields=[]), audio=audio)
        self.decoder = Decoder(loader_cfg, open_clip.image_transform(mc.image.image_size, is_train=False),
                               open_clip.tokenizer.SimpleTokenizer(context_length=mc.text.context_length),
                               mc.image.image_size, train=False)
        self.batch_size = batch_size
        self.width = mc.embed_dim

    def __call__(self, raws: list[RawSample]) -> dict[str, np.ndarray]:
        """``{"image_text", "audio_text": float32 [N] (NaN where a sample lacks either side or the scorer a tower),
        "image", "text", "audio": float16 [N, D] (zeros where absent)}`` for the samples ``raws``, in order."""
        import numpy as np
        import torch

        from data_pipeline.errors import SampleError

        out = {pair: np.full(len(raws), np.nan, dtype=np.float32) for pair in PAIRS}
        out.update({m: np.zeros((len(raws), self.width), dtype=np.float16) for m in MODALITIES})
        for start in range(0, len(raws), self.batch_size):
            chunk = raws[start:start + self.batch_size]
            decoded, where = [], []
            for i, raw in enumerate(chunk):
                try:
                    decoded.append(self.decoder(raw))
                    where.append(start + i)
                except SampleError:
                    continue
            if not decoded:
                continue
            batch = self.decoder.collate(decoded)
            index = np.array(where)
            vectors, has = {}, {}
            for modality in MODALITIES:
                has[modality] = batch[f"has_{modality}"] & (modality in self.modalities)
                vectors[modality] = torch.zeros(len(decoded), self.width)
                if has[modality].any():
                    rows = torch.nonzero(has[modality]).flatten()
                    with torch.no_grad():
                        vectors[modality][rows] = self.embed_rows(self.model, modality, batch, rows).float()
                out[modality][index] = vectors[modality].numpy().astype(np.float16)
            for pair, (a, b) in PAIRS.items():
                both = (has[a] & has[b]).numpy()
                similarity = (vectors[a] * vectors[b]).sum(-1).numpy()
                out[pair][index[both]] = similarity[both]
        return out
