"""Model FLOPs per training sample (for MFU) from the tower configs and the objectives a step runs.

Counted: the matmuls of every transformer pass a step makes (QKV, attention output, MLP, and the two attention
products), the MAE decoders, the fusion encoder and the vocabulary heads on ``mask_prob x context_length`` tokens
(an upper bound: captions are shorter than the context), and a convolutional image stem (``model.image.stem=conv``,
which runs on every pixel even when patches are dropped); forward + backward = 3 x forward. Left out: patch
embeddings, norms, softmax, losses (a few percent at ViT-B size). Every sample is assumed to carry every modality,
and 2 FLOPs per multiply-add, as in the PaLM paper's MFU.
"""

from __future__ import annotations

from pretrain.model.config import ModelConfig, VisionConfig, conv_stem_channels
from pretrain.objectives.config import ObjectivesConfig, fusion_context_ratios

# Dense 16-bit tensor-core peak per device, TFLOPS (vendor datasheets, no sparsity). First match by name wins.
PEAK_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H100", 989.0), ("H200 NVL", 835.0),
               ("H200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("A10", 125.0), ("V100", 125.0))


def peak_tflops(device_name: str) -> float | None:
    return next((peak for name, peak in PEAK_TFLOPS if name in device_name), None)


def stack_flops(tokens: int, width: int, layers: int, mlp_ratio: float = 4.0, context: int = 0) -> float:
    """Forward FLOPs of ``layers`` pre-norm blocks on one sequence of ``tokens``; ``context`` > 0 adds a
    cross-attention to that many memory tokens per block (the fusion encoder)."""
    matmuls = 2 * tokens * (4 + 2 * mlp_ratio) * width**2
    attention = 4 * tokens * tokens * width
    if context:
        matmuls += 2 * (2 * tokens + 2 * context) * width**2
        attention += 4 * tokens * context * width
    return layers * (matmuls + attention)


def conv_stem_flops(image: VisionConfig) -> float:
    """Forward FLOPs of the conv stem on one image: its 3x3 stride-2 stages, then the 1x1 projection."""
    channels, side, flops = conv_stem_channels(image.width, image.patch_size), image.image_size, 0.0
    for c_in, c_out in zip(channels, channels[1:]):
        side = -(-side // 2)
        flops += 2 * side * side * 9 * c_in * c_out
    return flops + 2 * side * side * channels[-1] * image.width


def train_flops_per_sample(model: ModelConfig, objectives: ObjectivesConfig) -> float:
    """Forward + backward FLOPs of one sample through the passes one training step runs; the masked objectives'
    passes count ``objectives.masked_batch_fraction`` of a sample (they read that share of the batch)."""
    image_patches = (model.image.image_size // model.image.patch_size) ** 2
    audio_patches = (model.audio.n_mels // model.audio.patch_size) * (model.audio.frames // model.audio.patch_size)
    contrastive = objectives.contrastive
    part = objectives.masked_batch_fraction
    pairs = {name for name, weight in contrastive.pairs.items() if weight > 0} if contrastive.weight > 0 else set()
    # (modality, mask ratio): each tower pass runs once per batch it reads (shared with FLIP on the whole batch).
    whole: set[tuple[str, float]] = set()
    masked_passes: set[tuple[str, float]] = set()
    for modality, masked in (("image", objectives.masked_image), ("audio", objectives.masked_audio)):
        if any(modality in pair.split("_") for pair in pairs):
            ratio = (masked.mask_ratio if masked.weight > 0 else contrastive.mask_ratio) if contrastive.use_masked_forward else 0.0
            whole.add((modality, ratio))
        if masked.weight > 0:
            masked_passes.add((modality, masked.mask_ratio))
    cross = objectives.cross_modal_masked
    context = fusion_context_ratios(objectives) if cross.weight > 0 else {}
    # A context pass the whole batch runs already is sliced for the objective's rows, not run again.
    masked_passes |= {key for key in context.items() if key not in whole}
    passes = {key: part for key in masked_passes}
    for key in whole:  # at part 1 a masked objective reuses the whole batch's pass; below, its rows run their own
        passes[key] = 1.0 if part == 1 else passes.get(key, 0.0) + 1.0

    towers = {"image": (image_patches, model.image), "audio": (audio_patches, model.audio)}
    tokens_at = lambda modality, ratio: 1 + max(1, round(towers[modality][0] * (1 - ratio)))
    flops = 0.0
    for (modality, ratio), share in passes.items():
        patches, tower = towers[modality]
        tokens = tokens_at(modality, ratio)
        pass_flops = stack_flops(tokens, tower.width, tower.layers, tower.mlp_ratio)
        if modality == "image" and model.image.stem == "conv":
            pass_flops += conv_stem_flops(model.image)
        flops += share * pass_flops
    text = model.text
    text_pass = stack_flops(text.context_length, text.width, text.layers, text.mlp_ratio)
    text_pairs = any("text" in pair.split("_") for pair in pairs)
    # hard_negatives: one more pass for each caption with phrases (an upper bound: counted for every caption)
    flops += text_pairs * (1 + contrastive.hard_negatives) * text_pass
    flops += part * ((objectives.masked_text.weight > 0) + (objectives.cross_modal_masked.weight > 0)) * text_pass
    decoder = model.decoder
    for modality, masked in (("image", objectives.masked_image), ("audio", objectives.masked_audio)):
        if masked.weight > 0:
            flops += part * stack_flops(1 + towers[modality][0], decoder.width, decoder.layers)
    # The vocabulary heads run on the selected tokens only.
    if objectives.masked_text.weight > 0:
        flops += part * 2 * objectives.masked_text.mask_prob * text.context_length * text.width * text.vocab_size
    if cross.weight > 0:
        fusion, selected = model.fusion, cross.mask_prob * text.context_length
        memory = sum(tokens_at(modality, ratio) for modality, ratio in context.items())
        flops += part * stack_flops(text.context_length, fusion.width, fusion.layers, 4.0, memory)
        # Tied to the token embedding, a fusion width other than the text width is projected to it first.
        width = text.width if model.tie_word_embeddings else fusion.width
        projection = fusion.width * text.width if model.tie_word_embeddings and fusion.width != text.width else 0
        flops += part * 2 * selected * (projection + width * text.vocab_size)
    return 3 * flops
