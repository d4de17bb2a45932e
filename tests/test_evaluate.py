"""Evaluation batching: the eval forward's batch shrinks with the image area; predictions do not depend on it."""

import torch


def test_the_eval_batch_shrinks_with_the_image_area_and_predictions_do_not_depend_on_it():
    from cleanse.engine.evaluate import eval_batch, predict

    def images(side: int, n: int = 3) -> torch.Tensor:
        return torch.zeros(n, side, side, 3, dtype=torch.uint8)

    assert [eval_batch(images(s)) for s in (8, 32, 64, 224, 2000)] == [1024, 1024, 256, 20, 1]
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = (torch.rand(45, 40, 40, 3, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    assert eval_batch(x) == 655  # 1024 * 32 * 32 // (40 * 40)
    whole = predict(net, x, return_logits=True)
    assert torch.allclose(predict(net, x, batch_size=7, return_logits=True), whole, atol=1e-6)
