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
