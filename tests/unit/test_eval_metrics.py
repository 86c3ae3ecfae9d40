import torch

from pretrain.evaluate import recall_at_k, topk_accuracy


def test_recall_at_k_on_a_hand_built_matrix():
    similarity = torch.tensor([
        [0.9, 0.1, 0.0, 0.0],   # match ranked 1st
        [0.8, 0.5, 0.0, 0.0],   # match ranked 2nd
        [0.9, 0.8, 0.7, 0.1],   # match ranked 3rd
        [0.5, 0.5, 0.5, 0.1],   # match ranked 4th
    ])
    assert recall_at_k(similarity, ks=(1, 2, 3, 4)) == {"R@1": 25.0, "R@2": 50.0, "R@3": 75.0, "R@4": 100.0}
    assert recall_at_k(similarity.T, ks=(1,))["R@1"] == 75.0  # ties count as found: only column 1 is beaten


def test_topk_and_mean_per_class_recall():
    logits = torch.tensor([[3.0, 2.0, 1.0], [1.0, 3.0, 2.0], [3.0, 1.0, 2.0], [1.0, 2.0, 3.0]])
    labels = torch.tensor([0, 2, 2, 2])
    out = topk_accuracy(logits, labels, ks=(1, 2))
    assert out["top1"] == 50.0 and out["top2"] == 100.0
    # class 0: 1/1 right, class 2: 1/3 right → mean per-class recall (1 + 1/3) / 2
    assert abs(out["mean_per_class_recall"] - 100 * (1 + 1 / 3) / 2) < 1e-4


def test_the_binding_probe_swaps_each_caption_the_same_way_in_any_batch():
    from open_clip.tokenizer import SimpleTokenizer

    from pretrain.evaluate import swapped_captions

    tokenizer = SimpleTokenizer(context_length=32)
    captions = ["a large red circle and a small blue star", "a green cross", "two red stars, a blue circle and a cross"]
    copies, valid = swapped_captions(tokenizer(captions), tokenizer)
    assert valid.tolist() == [True, False, True] and torch.equal(copies[1], tokenizer(captions[1:2])[0])
    again, _ = swapped_captions(tokenizer(captions[::-1]), tokenizer)  # another batch: the same copy per caption
    assert torch.equal(again.flip(0), copies)
    assert not torch.equal(copies[0], tokenizer(captions[:1])[0])


def test_binding_is_the_share_of_samples_whose_own_caption_beats_its_swapped_copy():
    from pretrain.evaluate import EMBEDDED, _score

    e = torch.eye(4)
    # Three samples with a swapped copy and one without: the image is nearer its own caption for two of the three.
    embedded = {"image": e[[0, 1, 2, 3]], "text": e[[0, 1, 3, 3]], "audio": torch.zeros(4, 4),
                "swapped": torch.stack([e[1], e[2], e[2], torch.zeros(4)])}
    present = {m: torch.tensor([True] * 4) for m in EMBEDDED}
    present["audio"] = torch.tensor([False] * 4)
    present["swapped"] = torch.tensor([True, True, True, False])
    metrics = _score([(["a", "b", "c", "d"], torch.full((4,), -1), embedded, present)], [], None)
    assert abs(metrics["eval/binding/image_to_text"] - 200 / 3) < 1e-4
    assert "eval/binding/audio_to_text" not in metrics
