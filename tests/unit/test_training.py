"""The GAN math itself: exact gradients, determinism, the unit schedule, aggregation."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ganns_async.model import build_models, count_parameters
from ganns_async.training import (
    StepAccumulator,
    TrainConfig,
    Trainer,
    UnitResult,
    check_result,
    compute_unit,
    epoch_permutation,
    max_local_change,
    plan_unit,
    run_local_unit,
    unit_noise,
)


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_parameter_counts_match_the_model_card() -> None:
    g, d = build_models(0)
    assert count_parameters(g) == 3_576_704
    assert count_parameters(d) == 2_765_568
    assert "main.0.weight" in g.state_dict() and "main.0.weight" in d.state_dict()


def test_discriminator_gradient_comes_from_its_own_loss_only() -> None:
    torch.manual_seed(0)
    g, d = build_models(1)
    images, noise = _images(8), unit_noise(11, 8)
    result = compute_unit(g, d, images, noise)

    # Reference: D's loss alone, on fresh copies, with no generator pass through D afterwards.
    g2, d2 = build_models(1)
    fake = g2(noise)
    loss_d = F.binary_cross_entropy_with_logits(d2(images), torch.ones(8)) + \
        F.binary_cross_entropy_with_logits(d2(fake.detach()), torch.zeros(8))
    loss_d.backward()
    for k, p in d2.named_parameters():
        assert torch.allclose(result.grads[f"D.{k}"], p.grad, atol=1e-6, rtol=1e-5), k
    # And the generator pass would have changed D's gradient had it leaked into it.
    d2.zero_grad()
    g2.zero_grad()
    loss_both = loss_d.detach() * 0 + F.binary_cross_entropy_with_logits(d2(g2(noise)), torch.ones(8))
    loss_both.backward()
    leaked = d2.main[0].weight.grad
    assert leaked is not None and leaked.abs().sum() > 0


def test_generator_gradient_is_the_non_saturating_loss() -> None:
    g, d = build_models(2)
    images, noise = _images(8, 1), unit_noise(5, 8)
    result = compute_unit(g, d, images, noise)
    g2, d2 = build_models(2)
    fake = g2(noise)
    # Same D BatchNorm history as compute_unit: D saw the real and the detached fake batch first.
    d2(images)
    d2(fake.detach())
    loss_g = F.binary_cross_entropy_with_logits(d2(fake), torch.ones(8))
    grads = torch.autograd.grad(loss_g, list(g2.parameters()))
    for (k, _), grad in zip(g2.named_parameters(), grads):
        assert torch.allclose(result.grads[f"G.{k}"], grad, atol=1e-6, rtol=1e-5), k


def test_same_unit_twice_is_bitwise_identical_and_leaves_the_model_untouched() -> None:
    g, d = build_models(3)
    before = {k: v.clone() for k, v in {**g.state_dict(), **{f"d{k}": v for k, v in d.state_dict().items()}}.items()}
    images, noise = _images(16, 2), unit_noise(99, 16)
    a = compute_unit(g, d, images, noise)
    b = compute_unit(g, d, images, noise)
    for k in a.grads:
        assert torch.equal(a.grads[k], b.grads[k]), k
    for k in a.buffers:
        assert torch.equal(a.buffers[k], b.buffers[k]), k
    after = {**g.state_dict(), **{f"d{k}": v for k, v in d.state_dict().items()}}
    for k, v in before.items():
        assert torch.equal(v, after[k]), k
    # The unit did move the running statistics it reports.
    assert not torch.equal(a.buffers["G.main.1.running_mean"], g.main[1].running_mean)


def test_noise_depends_on_the_seed_only() -> None:
    assert torch.equal(unit_noise(7, 4), unit_noise(7, 4))
    assert not torch.equal(unit_noise(7, 4), unit_noise(8, 4))


def test_every_image_once_per_epoch() -> None:
    cfg = TrainConfig(seed=5, unit_size=16, units_per_step=3)
    n = 50  # not a multiple of the unit size: units straddle epochs
    positions: list[int] = []
    for seq in range(0, 13):  # 208 positions: four full epochs and a bit
        positions.extend(plan_unit(cfg, n, seq).indices)
    for epoch in range(4):
        assert sorted(positions[epoch * n:(epoch + 1) * n]) == list(range(n))
    assert positions[:n] != positions[n:2 * n], "each epoch has its own order"
    assert plan_unit(cfg, n, 4).step == 1 and plan_unit(cfg, n, 4).epoch == 1
    assert list(epoch_permutation(5, 0, n)) == list(epoch_permutation(5, 0, n))
    assert plan_unit(cfg, n, 3) == plan_unit(cfg, n, 3)


def test_aggregation_is_sample_weighted_and_order_independent() -> None:
    g, d = build_models(4)
    r1 = compute_unit(g, d, _images(8, 3), unit_noise(1, 8))
    r2 = compute_unit(g, d, _images(4, 4), unit_noise(2, 4))
    ab, ba = StepAccumulator(0), StepAccumulator(0)
    ab.add(1, r1), ab.add(2, r2)
    ba.add(2, r2), ba.add(1, r1)
    ga, gb = ab.mean_grads(), ba.mean_grads()
    for k in ga:
        assert torch.equal(ga[k], gb[k]), k
        expected = (r1.grads[k].double() * 8 + r2.grads[k].double() * 4) / 12
        assert torch.allclose(ga[k], expected.float(), atol=1e-7)
    assert ab.n == 12


def test_adam_state_round_trips_for_resume() -> None:
    cfg = TrainConfig(seed=6)
    t1 = Trainer(cfg)
    g, d = t1.g, t1.d
    r = compute_unit(g, d, _images(4, 5), unit_noise(3, 4))
    acc = StepAccumulator(0)
    acc.add(0, r)
    t1.apply(acc.mean_grads(), acc.mean_buffers())
    tensors, meta = t1.optimizer_tensors()
    t2 = Trainer(cfg)
    t2.load_state(t1.state())
    t2.load_optimizer_tensors(tensors, meta)
    t1.apply(acc.mean_grads(), acc.mean_buffers())
    t2.apply(acc.mean_grads(), acc.mean_buffers())
    for (k, a), (_, b) in zip(t1.g.named_parameters(), t2.g.named_parameters()):
        assert torch.equal(a, b), k
    # G's moving average travels in the same blob and continues where it was.
    assert t1.g_ema is not None and t2.g_ema is not None and t2.ema_updates == t1.ema_updates == 2
    for (k, a), (_, b) in zip(t1.g_ema.state_dict().items(), t2.g_ema.state_dict().items()):
        assert torch.equal(a, b), k


def test_generator_moving_average_follows_its_warm_up() -> None:
    """After t updates the average moves by 1 - min(decay, (1 + t) / (10 + t)) towards G."""
    cfg = TrainConfig(seed=2, g_ema=0.999)
    trainer = Trainer(cfg)
    r = compute_unit(trainer.g, trainer.d, _images(4, 1), unit_noise(5, 4))
    acc = StepAccumulator(0)
    acc.add(0, r)
    key = "main.0.weight"
    expected = trainer.g.state_dict()[key].clone()
    for t in range(3):
        trainer.apply(acc.mean_grads(), acc.mean_buffers())
        beta = min(0.999, (1 + t) / (10 + t))
        expected = beta * expected + (1 - beta) * trainer.g.state_dict()[key]
    assert trainer.g_ema is not None
    ema = trainer.g_ema.state_dict()[key]
    assert torch.allclose(ema, expected, atol=1e-7)
    assert not torch.equal(ema, trainer.g.state_dict()[key])  # it lags behind the live weights
    ckpt = trainer.checkpoint(step=3, epoch=0, images_seen=12)
    assert torch.equal(ckpt["generator_state_dict"][key], ema)  # what users sample
    assert torch.equal(ckpt["generator_raw_state_dict"][key], trainer.g.state_dict()[key])

    off = Trainer(TrainConfig(seed=2, g_ema=0.0))
    off.apply(acc.mean_grads(), acc.mean_buffers())
    assert off.g_ema is None and off.sampler is off.g
    ckpt = off.checkpoint(step=1, epoch=0, images_seen=4)
    assert "generator_raw_state_dict" not in ckpt
    assert torch.equal(ckpt["generator_state_dict"][key], off.g.state_dict()[key])


def test_micro_batches_cover_the_whole_unit() -> None:
    """--batch-size splits a unit for small devices; without a split the result is unchanged."""
    g, d = build_models(8)
    images, noise = _images(12, 6), unit_noise(4, 12)
    whole = compute_unit(g, d, images, noise)
    same = compute_unit(g, d, images, noise, micro_batch=12)
    split = compute_unit(g, d, images, noise, micro_batch=5)  # chunks of 5, 5 and 2
    for k in whole.grads:
        assert torch.equal(whole.grads[k], same.grads[k]), k
        assert torch.isfinite(split.grads[k]).all(), k
    assert split.n_samples == 12
    # The chunks see different BatchNorm batches, so D's gradient moves, but stays close in direction.
    a, b = whole.grads["D.main.0.weight"].flatten(), split.grads["D.main.0.weight"].flatten()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.5


class _Images:
    """A dataset of random images, as run_local_unit reads one."""

    def __init__(self, n: int) -> None:
        self.images = _images(n, seed=3)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, indices: list[int]) -> tuple[torch.Tensor, list[int]]:
        return self.images[indices], []


def test_a_local_unit_trains_a_copy_and_returns_its_change() -> None:
    cfg = TrainConfig(seed=2, unit_size=8, local_steps=3, units_per_step=2)
    g, d = build_models(2)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    result, bad = run_local_unit(g, d, _Images(64), list(range(24)), 77, cfg)
    assert bad == [] and result.n_samples == 24
    assert all(torch.equal(before[k], v) for k, v in g.state_dict().items())  # the caller's model is untouched
    delta = result.grads["G.main.0.weight"]
    assert delta.shape == g.main[0].weight.shape and float(delta.abs().max()) > 0
    # Three Adam steps of lr 2e-4 move no weight by more than the bound the coordinator checks.
    assert check_result(result, cfg) is None
    assert max(float(v.abs().max()) for v in result.grads.values()) <= max_local_change(cfg)
    again, _ = run_local_unit(g, d, _Images(64), list(range(24)), 77, cfg)
    assert all(torch.equal(again.grads[k], v) for k, v in result.grads.items())  # deterministic


def test_hostile_local_results_are_refused() -> None:
    cfg = TrainConfig(seed=2, unit_size=8, local_steps=3, units_per_step=2)
    g, d = build_models(2)
    result, _ = run_local_unit(g, d, _Images(64), list(range(24)), 77, cfg)
    huge = UnitResult({**result.grads, "G.main.0.weight": result.grads["G.main.0.weight"] * 1e6},
                      result.buffers, result.n_samples, {})
    assert "changed by" in (check_result(huge, cfg) or "")
    negative = dict(result.buffers)
    negative["G.main.1.running_var"] = -torch.ones_like(negative["G.main.1.running_var"])
    assert "negative variance" in (check_result(UnitResult(result.grads, negative, 24, {}), cfg) or "")
    # A worker's batch counter is not trusted: the coordinator counts local steps itself.
    trainer = Trainer(cfg)
    lying = dict(result.buffers)
    lying["G.main.1.num_batches_tracked"] = torch.tensor(-5)
    acc = StepAccumulator(0)
    acc.add(1, UnitResult(result.grads, lying, 24, {}))
    trainer.update(acc)
    assert int(trainer.g.main[1].num_batches_tracked) == 3
    assert torch.allclose(trainer.g.main[0].weight, g.main[0].weight + result.grads["G.main.0.weight"])


def test_fedavg_lands_on_the_mean_of_the_workers_weights() -> None:
    cfg = TrainConfig(seed=4, unit_size=8, local_steps=2, units_per_step=2)
    trainer = Trainer(cfg)
    g0 = trainer.g.main[0].weight.detach().clone()
    acc = StepAccumulator(0)
    results = []
    for seq, n in ((0, 16), (1, 8)):
        r, _ = run_local_unit(trainer.g, trainer.d, _Images(64), list(range(seq * 16, seq * 16 + n)), seq, cfg)
        results.append(r)
        acc.add(seq, r)
    trainer.update(acc)
    expected = g0 + (16 * results[0].grads["G.main.0.weight"] + 8 * results[1].grads["G.main.0.weight"]) / 24
    assert torch.allclose(trainer.g.main[0].weight, expected, atol=1e-7)
