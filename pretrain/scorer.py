"""A release as curation's scorer: per sample the cosine similarity of its image and caption (CLIP score, as
DataComp filters by) and of its audio and caption, and the normalised embeddings they come from. Used by
``mmfuse curate scorer=RELEASE`` (data_pipeline/curate names this module, it does not import it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from data_pipeline.config import AudioFeatureConfig, LoaderConfig, MembersConfig
from data_pipeline.errors import SampleError
from data_pipeline.loader.decode import Decoder
from data_pipeline.loader.tarstream import RawSample

PAIRS = {"image_text": ("image", "text"), "audio_text": ("audio", "text")}


class ReleaseScorer:
    def __init__(self, path: str, members: MembersConfig, batch_size: int = 64):
        import open_clip

        from pretrain.evaluate import embed_rows
        from pretrain.release import load_release, release_front_end

        self.model, release = load_release(path)
        self.model.eval()
        self.embed_rows = embed_rows
        mc = self.model.cfg
        audio = dataclasses.replace(AudioFeatureConfig(), **release_front_end(release))  # the front end it heard
        loader_cfg = LoaderConfig(train="-", members=dataclasses.replace(members, task_fields=[]), audio=audio)
        self.decoder = Decoder(loader_cfg, open_clip.image_transform(mc.image.image_size, is_train=False),
                               open_clip.tokenizer.SimpleTokenizer(context_length=mc.text.context_length),
                               mc.image.image_size, train=False)
        self.batch_size = batch_size
        self.width = mc.embed_dim

    @torch.no_grad()
    def __call__(self, raws: list[RawSample]) -> dict[str, np.ndarray]:
        """``{"image_text", "audio_text": float32 [N] (NaN where a sample lacks either side), "image", "text",
        "audio": float16 [N, D] (zeros where absent)}`` for the samples ``raws``, in order."""
        out = {pair: np.full(len(raws), np.nan, dtype=np.float32) for pair in PAIRS}
        out.update({m: np.zeros((len(raws), self.width), dtype=np.float16) for m in ("image", "text", "audio")})
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
            vectors = {}
            for modality in ("image", "text", "audio"):
                present = batch[f"has_{modality}"]
                vectors[modality] = torch.zeros(len(decoded), self.width)
                if present.any():
                    rows = torch.nonzero(present).flatten()
                    vectors[modality][rows] = self.embed_rows(self.model, modality, batch, rows).float()
                out[modality][index] = vectors[modality].numpy().astype(np.float16)
            for pair, (a, b) in PAIRS.items():
                both = (batch[f"has_{a}"] & batch[f"has_{b}"]).numpy()
                similarity = (vectors[a] * vectors[b]).sum(-1).numpy()
                out[pair][index[both]] = similarity[both]
        return out
