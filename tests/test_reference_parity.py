"""The JAX trainer against a plain PyTorch reference of the paper's recipe (tests/reference_torch.py).

Both sides start from the same weights (the Flax init of the run, copied into torch) and take the
batches in the same order: the test recomputes the JAX trainer's per-epoch permutation from
train.py's `epoch_order`.
Everything is float32. Degradation is off (kind "none", level 0).

Findings that shape the tolerances (details in reference_torch.py and the tests' docstrings):
- torch's AdamW, optax's adamw and the trainer's `adamw` compute the same update (eps outside the square root of the
  bias-corrected second moment, both moments bias-corrected, weight decay multiplied by the
  scheduled learning rate); only the order of float32 operations differs.
- torch's CosineAnnealingLR (stepped per batch) is optax's cosine_decay_schedule up to the float32
  rounding of optax's 1 + cos(.) near the end of the run.
- Pooled inputs: the per-step losses agree to ~1e-5 relative over 104 steps (1e-4 asserted).
  Token inputs to `cross` are only checked for one forward/backward pass: over many steps the two
  float32 trajectories drift apart (see test_token_inputs_forward_and_gradients_match).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch", reason="torch is not installed: the PyTorch reference parity tests need it")

import reference_torch as ref  # noqa: E402  (after the importorskip: it imports torch)
from scipy import stats  # noqa: E402

from fusion_jax.data import build_pairs  # noqa: E402
from fusion_jax.data.sources import load_features  # noqa: E402
from fusion_jax.fusion import make_head  # noqa: E402
from fusion_jax.groups import RunSpec, group_data, stack_runs  # noqa: E402
from fusion_jax.train import adamw, adamw_init, cosine_lr, epoch_order, make_train  # noqa: E402

BACKBONE = "aligned"


@pytest.fixture(autouse=True)
def one_torch_thread():
    """torch on one thread: these matmuls are tiny, and a second thread competing with XLA's on a
    busy 2-core machine makes the reference ~10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _setup(config, method, scale, epochs, lr, dropout):
    config.train.epochs, config.train.learning_rate, config.train.dropout = epochs, lr, dropout
    config.degradation.kind, config.degradation.levels = "none", (0.0,)
    features = load_features(config, BACKBONE)
    pairs = build_pairs(features.caption_image, features.n_images, scale, config.pairs.split_seed)
    trainer = make_train(config, method, pairs.n_train, scale - pairs.n_train, noisy=False)
    return features, pairs, trainer


def _train_jax(trainer, runs, data, epochs):
    """Train a vmapped group: (initial params, losses [runs, steps], counts [runs, 4])."""
    state = jax.jit(jax.vmap(trainer.init, in_axes=(0, None)))(runs, data)
    init_params = jax.tree_util.tree_map(np.asarray, state["params"])
    train_epoch = jax.jit(trainer.train_epoch)
    losses = []
    for _ in range(epochs):
        state, epoch_losses = train_epoch(state, runs, data)
        losses.append(np.asarray(epoch_losses))
    counts = np.asarray(jax.jit(jax.vmap(trainer.evaluate, in_axes=(0, 0, None)))(state, runs, data))
    assert not counts[:, 4].any()  # every validation logit finite
    return init_params, np.concatenate(losses, axis=1), counts[:, :4]


def _epoch_orders(key, n_train, epochs):
    """The JAX trainer's batch order of each epoch, recomputed from train.py's scheme."""
    return [np.asarray(epoch_order(key, epoch, n_train, n_train)) for epoch in range(epochs)]


def _train_torch(method, config, features, pairs, flax_params, key, epochs):
    """Reference run from `flax_params` in the JAX run's batch order: (losses [steps], counts)."""
    hc, tc = config.head, config.train
    head = ref.make_head_torch(method, features.image.shape[-1], features.text.shape[-1], hc.hidden,
                               hc.mlp_hidden, tc.dropout, hc.num_heads)
    ref.load_flax_params(head, flax_params)
    arrays = features.arrays()
    losses = ref.train_reference(head, arrays, pairs.split("train"), _epoch_orders(key, pairs.n_train, epochs),
                                 tc.learning_rate, tc.weight_decay, epochs, tc.batch_size)
    return np.asarray(losses), np.asarray(ref.evaluate_reference(head, arrays, pairs.split("val")))


def test_reference_validates_without_dropout():
    """The reference's validation counts (its accuracy in the benchmark) are the eval-mode head's, whatever it
    trains with: the same under any torch seed, and the head left in eval mode."""
    import torch

    rng = np.random.default_rng(0)
    features = {m: rng.standard_normal((200, 8)).astype(np.float32) for m in ("image", "text")}
    pairs = {"image_idx": np.arange(200), "caption_idx": np.arange(200), "label": rng.integers(0, 2, 200)}
    head = ref.make_head_torch("concat", 8, 8, hidden=16, mlp_hidden=16, dropout=0.5).train()
    counts = []
    for seed in range(3):
        torch.manual_seed(seed)
        counts.append(ref.evaluate_reference(head, features, pairs))
    assert counts[0] == counts[1] == counts[2] and sum(counts[0]) == 200 and not head.training


def test_cosine_annealing_matches_optax_schedule():
    """CosineAnnealingLR(T_max=total) stepped per batch gives optax's cosine_decay_schedule(lr, total),
    and the trainer's `cosine_lr` (the same formula with a per-run total) gives optax's values.

    torch's recursive form agrees with the float64 closed form lr (1 + cos(pi t / T)) / 2 to
    1e-12; optax evaluates it in float32, whose 1 + cos(.) loses relative precision near t = T
    (absolute error ~1e-7 lr, relative up to ~3e-3 at the last of 1000 steps).
    """
    lr = 1e-3
    for total in (104, 1000):
        t = np.arange(total)
        torch_lrs = np.asarray(ref.cosine_lrs(lr, total))
        optax_lrs = np.asarray(optax.cosine_decay_schedule(lr, total)(jnp.asarray(t)), np.float64)
        closed_form = lr * 0.5 * (1.0 + np.cos(np.pi * t / total))
        np.testing.assert_allclose(torch_lrs, closed_form, rtol=1e-12)
        np.testing.assert_allclose(optax_lrs, torch_lrs, rtol=1e-5, atol=1e-6 * lr)
        ours = np.asarray(cosine_lr(lr, jnp.asarray(t), jnp.asarray(total, jnp.int32)), np.float64)
        np.testing.assert_allclose(ours, optax_lrs, rtol=1e-6, atol=1e-9 * lr)


def test_adamw_matches_optax():
    """torch.optim.AdamW + CosineAnnealingLR, optax.adamw(cosine_decay_schedule) and the trainer's
    `adamw` + `cosine_lr` on one tensor.

    The same gradient sequence (all entries of order 1) gives the same parameters to float32
    rounding: the update rules are identical (see reference_torch.py's docstring). An inactive
    step of the trainer's `adamw` leaves parameters and state exactly unchanged.
    """
    lr, weight_decay, total = 1e-2, 0.01, 50
    rng = np.random.default_rng(0)
    init = rng.normal(size=(8, 5)).astype(np.float32)
    grads = rng.normal(size=(total, 8, 5)).astype(np.float32)

    param = torch.nn.Parameter(torch.from_numpy(init.copy()))
    optimizer = torch.optim.AdamW([param], lr=lr, weight_decay=weight_decay, eps=1e-8)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
    tx = optax.adamw(optax.cosine_decay_schedule(lr, total), weight_decay=weight_decay, eps=1e-8)
    params = jnp.asarray(init)
    opt_state = tx.init(params)
    ours, ours_state = params, adamw_init(params)
    for t, g in enumerate(grads):
        param.grad = torch.from_numpy(g)
        optimizer.step()
        scheduler.step()
        updates, opt_state = tx.update(jnp.asarray(g), opt_state, params)
        params = optax.apply_updates(params, updates)
        np.testing.assert_allclose(param.detach().numpy(), np.asarray(params), rtol=1e-5, atol=1e-6)
        idle = adamw(ours, jnp.asarray(g), ours_state, lr, weight_decay, jnp.asarray(False))
        chex.assert_trees_all_equal(idle, (ours, ours_state))
        ours, ours_state = adamw(ours, jnp.asarray(g), ours_state, cosine_lr(lr, t, total), weight_decay,
                                 jnp.asarray(True))
        np.testing.assert_allclose(np.asarray(ours), np.asarray(params), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["concat", "cross"])
def test_training_matches_reference_step_by_step(smoke_config, method):
    """Same init, batch order and schedule, no dropout: per-step losses agree to 1e-4 relative.

    Smoke features, scale 512: 410 training pairs, 13 steps an epoch (the last one 26 pairs: the
    partial batch is kept on both sides), 8 epochs = 104 steps. Learning rate 5e-4 (not the
    default 1e-4) so that the loss really moves (concat 0.68 -> 0.5, cross 0.68 -> 0.17) and the
    check covers a real trajectory. Observed agreement: ~5e-6 relative at worst. The final
    validation confusion counts are equal. At lr 1e-3 the cross head's float32 trajectories can
    split: for seeds 0 and 42 (not 1) the relative difference jumps from ~5e-6 to ~1e-3 within a
    few steps of epoch 5 and stays there (Adam turns rounding in near-zero gradients into lr-sized
    steps), while both sides still reach the same loss and counts.
    """
    epochs = 8
    features, pairs, trainer = _setup(smoke_config, method, scale=512, epochs=epochs, lr=5e-4, dropout=0.0)
    assert trainer.steps_per_epoch * epochs >= 100 and pairs.n_train % smoke_config.train.batch_size
    runs = stack_runs((RunSpec(BACKBONE, method, 512, 42, "none", 0.0),), {512: pairs})
    init_params, jax_losses, jax_counts = _train_jax(trainer, runs, group_data(features), epochs)

    first = jax.tree_util.tree_map(lambda x: x[0], init_params)
    torch_losses, torch_counts = _train_torch(method, smoke_config, features, pairs, first, runs["key"][0], epochs)

    assert torch_losses.shape == jax_losses[0].shape == (104,)
    np.testing.assert_allclose(torch_losses, jax_losses[0], rtol=1e-4, atol=0)
    assert jax_losses[0, -13:].mean() < 0.8 * jax_losses[0, :13].mean()  # it did learn
    np.testing.assert_array_equal(torch_counts, jax_counts[0])


def _torch_head(method, features, hc, dropout, flax_params):
    """The reference head of `method` holding flax_params."""
    head = ref.make_head_torch(method, features.image.shape[-1], features.text.shape[-1], hc.hidden, hc.mlp_hidden,
                               dropout, hc.num_heads)
    return ref.load_flax_params(head, jax.tree_util.tree_map(np.asarray, flax_params))


def _assert_same_step(torch_head, x, label, logits, loss, grads, method, features, hc, atol, loss_rtol):
    """One reference forward and backward on batch x: its logits and loss are flax's, and the flax gradient
    tree, copied into a second torch head, lines up with the torch gradients."""
    torch_head.train()
    torch_logits = torch_head(*map(torch.from_numpy, x))
    torch_loss = torch.nn.CrossEntropyLoss()(torch_logits, torch.from_numpy(label).long())
    torch_loss.backward()
    np.testing.assert_allclose(torch_logits.detach().numpy(), np.asarray(logits), rtol=1e-5, atol=atol)
    np.testing.assert_allclose(torch_loss.item(), float(loss), rtol=loss_rtol)
    grad_head = _torch_head(method, features, hc, 0.0, grads)
    torch_grads = dict(torch_head.named_parameters())
    for name, g in grad_head.named_parameters():
        np.testing.assert_allclose(torch_grads[name].grad.numpy(), g.detach().numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("method", ["concat", "cross"])
def test_token_inputs_forward_and_gradients_match(smoke_config, method):
    """Token features with masks: logits and the gradient of the mean loss agree (one batch).

    Over many steps the `cross` trajectories on tokens drift apart in float32 (~1e-3 relative in
    the loss after ~35 steps at lr 1e-3), without any difference in the algorithm: the key bias
    has a gradient that is zero in exact arithmetic (softmax is shift-invariant over keys), so
    both AdamW implementations take learning-rate-sized steps driven by ~1e-11 rounding noise,
    and once the weights differ by ~1e-6 a ReLU pre-activation within ~3e-6 of zero lands on
    opposite sides of the kink, changing one unit's gradient by a finite amount. Hence the
    multi-step check uses pooled inputs and this test checks one step on tokens.
    """
    smoke_config.synthetic.tokens = 6
    features, pairs, trainer = _setup(smoke_config, method, scale=256, epochs=1, lr=1e-3, dropout=0.0)
    run = jax.tree_util.tree_map(lambda x: x[0], stack_runs((RunSpec(BACKBONE, method, 256, 0, "none", 0.0),),
                                                            {256: pairs}))
    params = jax.jit(trainer.init)(run, group_data(features))["params"]

    train = pairs.split("train")
    rows = np.arange(32)
    image_idx, caption_idx = train["image_idx"][rows], train["caption_idx"][rows]
    x = (features.image[image_idx], features.text[caption_idx],
         features.image_mask[image_idx], features.text_mask[caption_idx])
    label = train["label"][rows]
    hc = smoke_config.head
    head = make_head(method, hc.hidden, hc.mlp_hidden, 0.0, hc.num_heads)

    def loss_fn(p):
        logits = head.apply({"params": p}, *map(jnp.asarray, x))
        return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean(), logits

    (loss, logits), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)

    torch_head = _torch_head(method, features, hc, 0.0, params)
    _assert_same_step(torch_head, x, label, logits, loss, grads, method, features, hc, atol=1e-6, loss_rtol=1e-6)


class _FixedDropout(torch.nn.Module):
    """Dropout with a given keep mask: x * mask / keep (torch's and flax's scaling)."""

    def __init__(self, mask: np.ndarray, keep: float):
        super().__init__()
        self.mask, self.keep = torch.from_numpy(mask.astype(np.float32)), keep

    def forward(self, x):
        return x * self.mask / self.keep


@pytest.mark.parametrize("method", ["concat", "cross"])
def test_dropout_sits_and_scales_as_in_the_reference(smoke_config, method):
    """Dropout on, the same mask on both sides (flax's, read off its dropout layer's output): the
    logits, the loss and every gradient agree. A dropout elsewhere in the head, or another scaling of
    the kept units, on either side would not."""
    rate = 0.5  # many dropped units: a misplaced mask moves the logits far
    features, pairs, _ = _setup(smoke_config, method, scale=256, epochs=1, lr=1e-3, dropout=rate)
    hc = smoke_config.head
    head = make_head(method, hc.hidden, hc.mlp_hidden, rate, hc.num_heads)
    train = pairs.split("train")
    rows = np.arange(32)
    x = (features.image[train["image_idx"][rows]], features.text[train["caption_idx"][rows]])
    label = train["label"][rows]
    params = head.init(jax.random.PRNGKey(0), *map(jnp.asarray, x))["params"]
    dropout_key = jax.random.PRNGKey(1)

    def loss_fn(p):
        logits, seen = head.apply({"params": p}, *map(jnp.asarray, x), train=True, rngs={"dropout": dropout_key},
                                  capture_intermediates=True, mutable=["intermediates"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, label).mean(), (logits, seen["intermediates"])

    (loss, (logits, seen)), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(params)
    units = np.maximum(np.asarray(seen["Classifier_0"]["Dense_0"]["__call__"][0]), 0.0)  # ReLU: dropout's input
    dropped = np.asarray(seen["Classifier_0"]["Dropout_0"]["__call__"][0])
    mask = dropped != 0
    assert 0.3 < mask[units > 0].mean() < 0.7  # about half of the live units kept
    np.testing.assert_allclose(dropped[mask], units[mask] / (1 - rate), rtol=1e-6)

    torch_head = _torch_head(method, features, hc, rate, params)
    torch_head.classifier.dropout = _FixedDropout(mask, 1 - rate)
    _assert_same_step(torch_head, x, label, logits, loss, grads, method, features, hc, atol=1e-5, loss_rtol=1e-5)
    torch_head.classifier.dropout = _FixedDropout(mask, 1.0)  # the kept units not rescaled: another function
    assert not np.allclose(torch_head(*map(torch.from_numpy, x)).detach().numpy(), np.asarray(logits), rtol=1e-3)


@pytest.mark.parametrize("method", ["concat", "cross"])
def test_dropout_training_agrees_statistically(smoke_config, method):
    """With dropout 0.1 the two implementations reach statistically indistinguishable results.

    Five seeds each way (seeds 0-4), smoke features, scale 1024 (819 training / 205 validation
    pairs), 4 epochs = 104 steps, lr 1e-3. Run i of both sides starts from the same Flax init and
    uses the same batch order; only the dropout masks differ (JAX: the trainer's dropout keys;
    torch: torch.manual_seed(seed)). For validation accuracy and for the mean training loss of the
    last epoch, a Welch t-test of JAX against torch must give p > 0.01: with 5 + 5 values
    (about 8 degrees of freedom) that allows a mean difference of about 3.4 standard errors.
    Sharing init and order makes the pairs positively correlated, so the unpaired test is
    conservative (it rarely fails by chance). The check catches a gross dropout mismatch (e.g.
    rate 0.3 or 0.5 on one side, which moves the training loss by 4-9 standard errors) but not a
    subtle one: dropout 0.1 itself changes these numbers by little. Observed: accuracies ~0.80
    (concat) and ~0.89 (cross), p > 0.5 on both checks.
    """
    epochs, scale, seeds = 4, 1024, range(5)
    features, pairs, trainer = _setup(smoke_config, method, scale=scale, epochs=epochs, lr=1e-3, dropout=0.1)
    n_val = scale - pairs.n_train
    runs = stack_runs(tuple(RunSpec(BACKBONE, method, scale, seed, "none", 0.0) for seed in seeds), {scale: pairs})
    init_params, jax_losses, jax_counts = _train_jax(trainer, runs, group_data(features), epochs)

    torch_losses, torch_counts = [], []
    for i, seed in enumerate(seeds):
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            params = jax.tree_util.tree_map(lambda x: x[i], init_params)
            losses, counts = _train_torch(method, smoke_config, features, pairs, params, runs["key"][i], epochs)
        torch_losses.append(losses)
        torch_counts.append(counts)
    torch_losses, torch_counts = np.stack(torch_losses), np.stack(torch_counts)

    accuracy = lambda c: (c[:, 0] + c[:, 3]) / n_val
    last_epoch_loss = lambda losses: losses[:, -trainer.steps_per_epoch:].mean(axis=1)
    for name, jax_values, torch_values in (
            ("validation accuracy", accuracy(jax_counts), accuracy(torch_counts)),
            ("last-epoch training loss", last_epoch_loss(jax_losses), last_epoch_loss(torch_losses))):
        if np.ptp(jax_values) == np.ptp(torch_values) == 0:  # no spread: the t-test is undefined
            assert jax_values[0] == torch_values[0], f"{name}: JAX {jax_values} vs torch {torch_values}"
            continue
        p = stats.ttest_ind(jax_values, torch_values, equal_var=False).pvalue
        assert p > 0.01, f"{name}: JAX {jax_values} vs torch {torch_values}, Welch p = {p:.3g}"
