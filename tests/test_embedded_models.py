"""The embedded backbones' training pieces (features.embedded_models), each against a plain reference: the
contrastive loss, the caption each sampled image is paired with, and the processors their folders ship."""

import types

import jax
import numpy as np
import pytest

from fusion_jax.data.embedded import generate_embedded
from fusion_jax.features import embedded_models as em
from fusion_jax.features.preprocess import ImagePreprocessor


def test_contrastive_loss_is_clips_symmetric_infonce():
    """The mean of both directions' cross-entropies, each a log-softmax over its own axis (float64 reference);
    logits that are not symmetric tell a one-sided loss, or one direction counted twice, from CLIP's."""
    logits = np.random.default_rng(0).normal(size=(5, 5)) * 3
    logits[:, 0] += 4  # every image's best caption is the first: the two directions differ
    log_softmax = lambda x: x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
    images_to_captions = -np.diag(log_softmax(logits)).mean()
    captions_to_images = -np.diag(log_softmax(logits.T)).mean()
    assert abs(images_to_captions - captions_to_images) > 0.1  # the check below tells the two apart
    np.testing.assert_allclose(float(em.contrastive_loss(logits.astype(np.float32))),
                               (images_to_captions + captions_to_images) / 2, rtol=1e-5)


def test_each_sampled_image_is_paired_with_one_of_its_own_captions():
    """Captions listed in any order and images with unequal numbers of them: the caption index gives every
    sampled image one of its own captions, and over many draws each of them."""
    caption_image = np.array([2, 0, 3, 2, 1, 0, 2, 3, 3, 0, 3], np.int32)
    index = em._caption_index(types.SimpleNamespace(caption_image=caption_image, n_images=4))
    data = {k: jax.numpy.asarray(v) for k, v in index.items() if k != "order"}
    drawn = {image: set() for image in range(4)}
    for seed in range(60):
        idx, cap = map(np.asarray, em._sample_captions(jax.random.PRNGKey(seed), data, 3))
        captions = index["order"][cap]
        assert (caption_image[captions] == idx).all() and len(set(idx)) == 3
        for image, caption in zip(idx, captions):
            drawn[image].add(int(caption))
    assert drawn == {image: set(np.flatnonzero(caption_image == image)) for image in range(4)}


@pytest.mark.parametrize("processor, mean, std", [(em.clip_processor, em.CLIP_MEAN, em.CLIP_STD),
                                                  (em.resnet_processor, em.IMAGENET_MEAN, em.IMAGENET_STD)])
def test_the_processors_the_tiny_models_ship_see_the_whole_image_as_training_did(processor, mean, std):
    """Features are extracted through the processor saved beside each tiny model: on the embedded dataset's
    images it must give the pixels training normalised (no crop, no resize at their native size)."""
    ds = generate_embedded(n_images=3, seed=1, image_size=32)
    images = np.stack([ds.load_image(i) for i in range(3)])
    extracted = ImagePreprocessor.from_processor(processor(32), num_threads=1)(list(images))
    np.testing.assert_allclose(extracted, np.asarray(em._normalize(images, mean, std)), atol=1e-6)


def test_fit_warms_up_for_a_tenth_of_its_steps_decays_weights_and_draws_a_key_per_step():
    """With a constant gradient (loss = sum(w)) Adam moves each weight by the step's learning rate: the loss's
    drops are 3 x optax's warmup_cosine_decay_schedule(0, lr, steps // 10, steps). A zero gradient leaves the
    decoupled weight decay alone (1e-4 x each step's rate). A loss of uniform(key) differs at every step."""
    import jax.numpy as jnp
    import optax

    steps, lr = 20, 0.1
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps)
    _, _, losses = em.fit(lambda p, state, data, key: (p["w"].sum(), state), {"w": jnp.zeros(3)}, jnp.ones(3),
                          steps, lr, 0, "test")
    np.testing.assert_allclose(np.diff(losses), -3 * np.asarray([schedule(t) for t in range(steps - 1)]),
                               rtol=2e-3, atol=1e-6)
    params, _, _ = em.fit(lambda p, state, data, key: ((p["w"] * 0.0).sum(), state), {"w": jnp.ones(3)},
                          jnp.ones(3), steps, lr, 0, "test")
    want = 1 - np.prod([1 - 1e-4 * float(schedule(t)) for t in range(steps)])
    np.testing.assert_allclose(1 - np.asarray(params["w"]), [want] * 3, rtol=2e-2)
    _, _, losses = em.fit(lambda p, state, data, key: ((p["w"] * 0).sum() + jax.random.uniform(key), state),
                          {"w": jnp.zeros(3)}, jnp.ones(3), 8, 0.0, 0, "test")
    assert len(set(np.asarray(losses).tolist())) == 8, losses
