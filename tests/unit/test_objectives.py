import open_clip
from open_clip.loss import SigLipLoss
import pytest
import torch
import torch.nn.functional as F

from mmfuse.config import load_config
from pretrain.model import ModelConfig, MultimodalModel
from pretrain.objectives import DistContext, Forward, ObjectivesConfig, build_objectives
from pretrain.objectives.contrastive import clip_loss, siglip_loss
from pretrain.objectives.masked import mask_tokens

WS1 = DistContext()


def unit_rows(n, d=8, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_clip_loss_matches_open_clip_at_world_size_1():
    a, b, scale = unit_rows(6), unit_rows(6, seed=1), torch.tensor(10.0)
    expected = open_clip.ClipLoss()(a, b, scale)
    assert torch.allclose(clip_loss(a, b, scale, WS1), expected, atol=1e-6)


def test_clip_loss_by_hand():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = 2 * I: each row's loss is log(1 + e^-2); both directions equal.
    assert torch.allclose(clip_loss(a, b, torch.tensor(2.0), WS1), torch.log(1 + torch.exp(torch.tensor(-2.0))))


def test_siglip_loss_matches_open_clip_at_world_size_1():
    a, b = unit_rows(5), unit_rows(5, seed=2)
    scale, bias = torch.tensor(10.0), torch.tensor(-3.0)
    expected = SigLipLoss()(a, b, scale, bias)
    assert torch.allclose(siglip_loss(a, b, scale, bias, WS1), expected, atol=1e-5)


def test_mask_tokens_never_touches_special_tokens():
    torch.manual_seed(0)
    text = torch.zeros(64, 12, dtype=torch.long)
    text[:, 0], text[:, 1:9], text[:, 9] = 49406, torch.randint(1, 1000, (64, 8)), 49407
    inputs, selected, use_mask = mask_tokens(text, 0.15)
    assert not selected[:, [0, 9, 10, 11]].any() and selected.any(dim=1).all()
    assert (use_mask <= selected).all()
    assert torch.equal(inputs[~selected], text[~selected])
    assert 0.1 < selected[:, 1:9].float().mean() < 0.35


def test_mask_tokens_selects_15_percent_and_replaces_80_10_10():
    torch.manual_seed(0)
    # Captions of 60 tokens: the one prediction guaranteed to a caption none of whose tokens was drawn adds ~0.
    text = torch.zeros(1000, 64, dtype=torch.long)
    text[:, 0], text[:, 1:61], text[:, 61] = 49406, torch.randint(1, 1000, (1000, 60)), 49407
    inputs, selected, use_mask = mask_tokens(text, 0.15)
    n = selected.sum().item()
    assert n / 60000 == pytest.approx(0.15, abs=0.01)
    replaced = selected & ~use_mask & (inputs != text)
    kept = selected & ~use_mask & (inputs == text)
    assert use_mask.sum().item() / n == pytest.approx(0.8, abs=0.02)
    assert replaced.sum().item() / n == pytest.approx(0.1, abs=0.02)  # a random token (rarely the same one)
    assert kept.sum().item() / n == pytest.approx(0.1, abs=0.02)
    assert ((inputs[replaced] >= 1) & (inputs[replaced] < 49406)).all()  # never a start / end / padding token


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return MultimodalModel(load_config(ModelConfig, ["configs/model/tiny.yaml"], ["fused_patch_decoder=true"]))


def make_batch(n=6, missing=True):
    g = torch.Generator().manual_seed(1)
    text = torch.zeros(n, 32, dtype=torch.long)
    text[:, 0], text[:, 1:7], text[:, 7] = 49406, torch.randint(1, 1000, (n, 6), generator=g), 49407
    batch = {"image": torch.randn(n, 3, 64, 64, generator=g), "text": text, "audio": torch.randn(n, 64, 192, generator=g) - 8,
             "has_image": torch.ones(n, dtype=torch.bool), "has_text": torch.ones(n, dtype=torch.bool),
             "has_audio": torch.ones(n, dtype=torch.bool)}
    if missing:
        batch["has_audio"][::2] = False
        batch["has_text"][1] = False
    return batch


ALL_ON = ["masked_image.weight=1", "masked_audio.weight=1", "masked_text.weight=1", "cross_modal_masked.weight=1"]


def test_every_objective_gives_a_finite_loss_and_gradients(tiny):
    cfg = load_config(ObjectivesConfig, [], ALL_ON)
    objectives = build_objectives(cfg)
    batch = make_batch()
    tiny.zero_grad()
    losses = {}
    forward = Forward(tiny, batch)
    for objective in objectives:
        losses.update(objective(tiny, batch, forward, WS1))
    assert set(losses) == {"contrastive/image_text", "contrastive/audio_text", "contrastive/image_audio",
                           "masked_image", "masked_audio", "masked_text", "cross_modal_masked"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name in ("clip.visual.conv1.weight", "audio.vit.patch_embed.proj.weight", "fusion.query_in.weight",
                 "image_decoder.head.weight", "mlm_head.proj.weight", "mlm_head.bias", "text_mlm_head.bias",
                 "clip.token_embedding.weight", "text_mask_embedding", "clip.logit_scale"):
        assert tiny.get_parameter(name).grad is not None and tiny.get_parameter(name).grad.abs().sum() > 0, name


def test_missing_modality_is_left_out_not_zero_filled(tiny):
    cfg = load_config(ObjectivesConfig, [], ["contrastive.pairs={image_text: 1.0}"])
    (contrastive,) = build_objectives(cfg)
    full = make_batch(missing=False)
    with_gap = {k: v.clone() for k, v in full.items()}
    with_gap["has_text"][2] = False
    with_gap["text"][2] = 12345  # garbage where the caption is missing: must not matter
    dropped = {k: v[[0, 1, 3, 4, 5]] for k, v in full.items()}
    with torch.no_grad():
        a = contrastive(tiny, with_gap, Forward(tiny, with_gap), WS1)["contrastive/image_text"]
        b = contrastive(tiny, dropped, Forward(tiny, dropped), WS1)["contrastive/image_text"]
    assert torch.allclose(a, b, atol=1e-6)


def test_flip_reuses_the_masked_image_pass(tiny):
    cfg = load_config(ObjectivesConfig, [], ["masked_image.weight=1", "contrastive.use_masked_forward=true",
                                             "contrastive.pairs={image_text: 1.0}"])
    batch = make_batch(missing=False)
    forward = Forward(tiny, batch)
    calls = []
    original = tiny.encode_image
    tiny.encode_image = lambda *args, **kw: calls.append(1) or original(*args, **kw)
    try:
        for objective in build_objectives(cfg):
            objective(tiny, batch, forward, WS1)
    finally:
        del tiny.encode_image
    assert len(calls) == 1  # one image encoder pass feeds both losses


def test_no_objective_is_an_error():
    with pytest.raises(ValueError, match="weight 0"):
        build_objectives(load_config(ObjectivesConfig, [], ["contrastive.weight=0"]))


ALONE = {
    "contrastive": ["contrastive.pairs.audio_text=0", "contrastive.pairs.image_audio=0"],
    "contrastive_audio": ["contrastive.pairs.image_text=0", "contrastive.pairs.image_audio=0"],
    "masked_image": ["contrastive.weight=0", "masked_image.weight=1"],
    "masked_audio": ["contrastive.weight=0", "masked_audio.weight=1"],
    "masked_text": ["contrastive.weight=0", "masked_text.weight=1"],
    "cross_modal_masked": ["contrastive.weight=0", "cross_modal_masked.weight=1"],
    "cross_modal_masked_patches": ["contrastive.weight=0", "cross_modal_masked.weight=1", "cross_modal_masked.patches=true"],
}


@pytest.mark.parametrize("case", sorted(ALONE))
def test_objective_parts_are_exactly_what_its_loss_reads(tiny, case):
    """The trainer freezes every part no enabled objective declares: a part read but not declared would silently
    not train, a part declared but not read would cost optimizer time for nothing."""
    from pretrain.model.multimodal import PARTS

    (objective,) = build_objectives(load_config(ObjectivesConfig, [], ALONE[case]))
    batch = make_batch(missing=False)
    tiny.zero_grad(set_to_none=True)
    sum(objective(tiny, batch, Forward(tiny, batch), WS1).values()).backward()
    reached = {part for part in PARTS
               if any(p.grad is not None and p.grad.abs().sum() > 0 for p in tiny.part_parameters(part))}
    assert reached == objective.parts


def _patches_by_hand(x: torch.Tensor, p: int) -> torch.Tensor:
    """``[B, C, H, W]`` → ``[B, N, p * p * C]``: row-major over the patch grid, each patch's pixels row by row with
    their channels last (MAE's layout), cut out one by one."""
    crops = [x[:, :, r:r + p, c:c + p].permute(0, 2, 3, 1).reshape(x.shape[0], -1)
             for r in range(0, x.shape[2], p) for c in range(0, x.shape[3], p)]
    return torch.stack(crops, dim=1)


def _capture(module):
    seen = {}
    handle = module.register_forward_hook(lambda _, args, output: seen.update(args=args, output=output))
    return seen, handle


@pytest.mark.parametrize("modality", ["image", "audio"])
def test_masked_patch_loss_by_hand(tiny, modality):
    from pretrain.objectives.masked import MaskedAudio, MaskedImage

    cfg = load_config(ObjectivesConfig, [], [f"masked_{modality}.weight=1"])
    objective = (MaskedImage if modality == "image" else MaskedAudio)(getattr(cfg, f"masked_{modality}"), cfg)
    batch = make_batch()
    seen, handle = _capture(getattr(tiny, f"{modality}_decoder"))
    with torch.no_grad():
        loss = objective(tiny, batch, Forward(tiny, batch), WS1)[f"masked_{modality}"]
    handle.remove()
    x = batch[modality][batch[f"has_{modality}"]].float()
    p = getattr(tiny.cfg, modality).patch_size
    target = _patches_by_hand(x if modality == "image" else x.unsqueeze(1), p)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    keep, prediction = seen["args"][1], seen["output"]
    assert keep.shape == (x.shape[0], round(target.shape[1] * 0.25))  # mask_ratio 0.75 by default
    errors, count = 0.0, 0
    for row in range(x.shape[0]):
        for patch in set(range(target.shape[1])) - set(keep[row].tolist()):  # the dropped patches only
            errors += ((prediction[row, patch] - target[row, patch]) ** 2).mean()
            count += 1
    assert loss.item() == pytest.approx((errors / count).item(), rel=1e-5)


@pytest.mark.parametrize("name", ["masked_text", "cross_modal_masked"])
def test_masked_token_loss_by_hand(tiny, name):
    """With mask_prob=1 every caption token (not start, end or padding) is predicted: the loss is the mean
    cross-entropy of the vocabulary head at those positions, in reading order."""
    cfg = load_config(ObjectivesConfig, [], [f"{name}.weight=1", f"{name}.mask_prob=1.0"])
    (objective,) = [o for o in build_objectives(cfg) if type(o).__name__ != "Contrastive"]
    batch = make_batch()
    seen, handle = _capture(tiny.text_mlm_head if name == "masked_text" else tiny.mlm_head)
    with torch.no_grad():
        loss = objective(tiny, batch, Forward(tiny, batch), WS1)[name]
    handle.remove()
    rows = batch["has_text"] if name == "masked_text" else batch["has_text"] & (batch["has_image"] | batch["has_audio"])
    text = batch["text"][rows]
    captions = text[(text != 0) & (text != 49406) & (text != 49407)]
    logits = seen["output"].float()
    assert logits.shape == (captions.numel(), 49408)
    assert loss.item() == pytest.approx(F.cross_entropy(logits, captions).item(), rel=1e-5)


def test_cross_modal_masked_patches_by_hand(tiny):
    """objectives.cross_modal_masked.patches: the fused patch decoder's predictions of the dropped patches of every
    sample with text and an image, scored like masked_image; and they depend on the caption."""
    cfg = load_config(ObjectivesConfig, [], ["contrastive.weight=0", "cross_modal_masked.weight=1",
                                             "cross_modal_masked.patches=true"])
    (objective,) = build_objectives(cfg)
    batch = make_batch()  # sample 1 has no caption: it is left out
    seen, handle = _capture(tiny.fused_patch_decoder)
    with torch.no_grad():
        torch.manual_seed(3)
        loss = objective(tiny, batch, Forward(tiny, batch), WS1)["cross_modal_masked/image"]
    handle.remove()
    rows = batch["has_text"] & batch["has_image"]
    target = _patches_by_hand(batch["image"][rows].float(), tiny.cfg.image.patch_size)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    keep, prediction = seen["args"][2], seen["output"]
    assert prediction.shape == target.shape == (int(rows.sum()), 16, 3 * 16 * 16)
    masked = torch.ones(target.shape[:2], dtype=torch.bool).scatter_(1, keep, False)
    reference = ((prediction - target) ** 2).mean(-1)[masked].mean()
    assert loss.item() == pytest.approx(reference.item(), rel=1e-5)
    other = {**batch, "text": batch["text"].clone()}
    other["text"][:, 1:7] = 7  # other captions, same images and masks: other predictions
    with torch.no_grad():
        torch.manual_seed(3)
        changed = objective(tiny, other, Forward(tiny, other), WS1)["cross_modal_masked/image"]
    assert changed.item() != loss.item()


@pytest.mark.parametrize("case", ["no caption", "captions but one image, uncaptioned"])
def test_a_batch_with_nothing_to_predict_gives_zero_losses_that_still_reach_every_part(tiny, case):
    """A rank's micro-batch can hold no sample an objective uses: its loss is 0, and its parts still get (zero)
    gradients, so every rank's backward runs the same reductions."""
    cfg = load_config(ObjectivesConfig, [], ["contrastive.weight=0", "masked_text.weight=1", "cross_modal_masked.weight=1",
                                             "cross_modal_masked.patches=true"])
    batch = make_batch(missing=False)
    if case == "no caption":
        batch["has_text"][:] = False
    else:
        batch["has_image"][1:] = False
        batch["has_text"][0] = False
    tiny.zero_grad(set_to_none=True)
    forward, losses = Forward(tiny, batch), {}
    for objective in build_objectives(cfg):
        losses.update(objective(tiny, batch, forward, WS1))
    assert losses["cross_modal_masked/image"].item() == 0.0
    assert (losses["masked_text"].item() == 0.0) is (case == "no caption")
    sum(losses.values()).backward()
    for part in ("fusion", "mlm_head", "text_mlm_head", "fused_patch_decoder"):
        assert all(p.grad is not None for p in tiny.part_parameters(part)), part


def test_masked_objectives_read_their_fraction_of_the_batch_and_contrastive_the_whole(tiny):
    """objectives.masked_batch_fraction=0.5 on a batch of 6: every masked loss is the one the first 3 samples give
    alone (same random draws), the contrastive losses are the whole batch's, and every part still gets gradients."""
    from pretrain.step import PretrainStep, head_rows

    cfg = load_config(ObjectivesConfig, [], [*ALL_ON, "masked_batch_fraction=0.5"])
    objectives = build_objectives(cfg)
    batch = make_batch()
    weights = dict.fromkeys(["contrastive", "masked_image", "masked_audio", "masked_text", "cross_modal_masked"], 1.0)
    torch.manual_seed(3)
    tiny.zero_grad()
    losses = PretrainStep(tiny, objectives, WS1, weights, masked_batch_fraction=0.5)(batch)
    sum(losses.values()).backward()
    assert tiny.get_parameter("image_decoder.head.weight").grad.abs().sum() > 0
    assert tiny.get_parameter("clip.logit_scale").grad.abs().sum() > 0
    with torch.no_grad():
        torch.manual_seed(3)
        whole = PretrainStep(tiny, objectives[:1], WS1, weights)(batch)
        head = head_rows(batch, 0.5)
        assert head["image"].shape[0] == 3 and torch.equal(head["has_text"], batch["has_text"][:3])
        alone = PretrainStep(tiny, objectives[1:], WS1, weights)(head)
    for name, value in {**whole, **alone}.items():
        assert torch.allclose(losses[name], value, atol=1e-6), name
    assert head_rows(batch, 0.01)["text"].shape[0] == 1  # at least one sample


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.25"])
def test_a_masked_batch_fraction_outside_0_1_is_a_config_error(fraction, tmp_path):
    from mmfuse.config import ConfigError
    from pretrain.config import PretrainConfig

    with pytest.raises(ConfigError, match=rf"objectives.masked_batch_fraction must be in \(0, 1\], got {fraction}"):
        load_config(PretrainConfig, ["configs/pretrain/tiny.yaml"],
                    [f"run.dir={tmp_path}", "data.train=x", f"objectives.masked_batch_fraction={fraction}"])


def test_phrase_swaps_exchange_lined_up_words_between_phrases():
    from open_clip.tokenizer import SimpleTokenizer

    from pretrain.objectives.negatives import phrase_swaps

    tokenizer = SimpleTokenizer(context_length=32)
    captions = ["a photo of a large red circle and a small blue star", "one shape: a green triangle",
                "a red circle, a red circle"]
    separators = {t for word in ("and", ",") for t in tokenizer.encode(word)}
    seen = set()
    for u in (0.0, 0.4, 0.9):  # the draw picks which lined-up pair: the nouns, the colours or the sizes
        negatives, valid = phrase_swaps(tokenizer(captions), separators, tokenizer.eot_token_id, torch.tensor([[0.0, u]] * 3))
        assert valid.tolist() == [True, False, False]  # one phrase; two phrases that are the same words
        seen.add(tokenizer.decode([t for t in negatives[0].tolist()[1:] if t not in (0, tokenizer.eot_token_id)]).strip())
        assert torch.equal(negatives[1:], tokenizer(captions[1:]))
    assert seen == {"a photo of a large red star and a small blue circle", "a photo of a large blue circle and a small red star",
                    "a photo of a small red circle and a large blue star"}


def test_hard_negatives_are_extra_columns_of_the_image_and_audio_to_text_directions():
    a, b, negatives, scale = unit_rows(4), unit_rows(4, seed=1), unit_rows(3, seed=2), torch.tensor(10.0)
    logits = scale * a @ torch.cat([b, negatives]).T
    by_hand = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(scale * b @ a.T, torch.arange(4))) / 2
    assert torch.allclose(clip_loss(a, b, scale, WS1, negatives=negatives), by_hand, atol=1e-6)
    bias = torch.tensor(-3.0)
    extra = -F.logsigmoid(-(scale * a @ negatives.T + bias)).sum() / 4
    assert torch.allclose(siglip_loss(a, b, scale, bias, WS1, negatives=negatives),
                          siglip_loss(a, b, scale, bias, WS1) + extra, atol=1e-5)


def test_hard_negatives_reach_the_text_tower_for_captions_with_phrases(tiny):
    from open_clip.tokenizer import SimpleTokenizer

    tokenizer = SimpleTokenizer(context_length=32)
    batch = make_batch(n=4, missing=False)
    batch["text"] = tokenizer(["a red circle and a blue star", "a green cross", "a large star and a small circle",
                               "one shape: a cross"])
    plain = build_objectives(load_config(ObjectivesConfig, [], []))[0]
    (negated,) = build_objectives(load_config(ObjectivesConfig, [], ["contrastive.hard_negatives=true"]))
    torch.manual_seed(0)
    with torch.no_grad():
        base = plain(tiny, batch, Forward(tiny, batch), WS1)
        harder = negated(tiny, batch, Forward(tiny, batch), WS1)
    # Two more columns (two captions have phrases) can only raise the image/audio -> text cross-entropy.
    for pair in ("image_text", "audio_text"):
        assert harder[f"contrastive/{pair}"] > base[f"contrastive/{pair}"]
    assert torch.equal(harder["contrastive/image_audio"], base["contrastive/image_audio"])


@pytest.mark.parametrize("masked_context, image_tokens", [(False, 1 + 16), (True, 1 + 4)])
def test_cross_modal_masked_reads_the_full_passes_sliced_from_the_whole_batch(tiny, masked_context, image_tokens):
    """By default the fusion encoder reads every image patch (the contrastive loss's pass, its rows sliced for the
    masked objectives' share of the batch, never run again); cross_modal_masked.masked_context=true reads the
    quarter of the patches that masked_image keeps. Either way a step runs the image tower twice."""
    from pretrain.step import PretrainStep

    cfg = load_config(ObjectivesConfig, [], [*ALL_ON, "masked_batch_fraction=0.5",
                                             f"cross_modal_masked.masked_context={str(masked_context).lower()}"])
    batch = make_batch()
    seen, calls = {}, []
    hook = tiny.fusion.register_forward_hook(lambda module, args, output: seen.update(args[1]))
    encode = tiny.encode_image
    tiny.encode_image = lambda *args, **kwargs: calls.append(1) or encode(*args, **kwargs)
    try:
        with torch.no_grad():
            PretrainStep(tiny, build_objectives(cfg), WS1, {}, masked_batch_fraction=0.5)(batch)
    finally:
        hook.remove()
        del tiny.encode_image
    # The fusion reads the captioned samples of the first three: rows 0 and 2 (row 1 has no caption).
    assert seen["image"].shape[:2] == (2, image_tokens) and len(calls) == 2
    if not masked_context:  # those rows of the whole batch's full pass, exactly
        with torch.no_grad():
            full = tiny.encode_image(batch["image"]).tokens[[0, 2]]
        assert torch.allclose(seen["image"], full, atol=1e-6)
