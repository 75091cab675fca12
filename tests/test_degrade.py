import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax.degrade import degrade


def test_noise_is_fixed_per_vector():
    x = jax.random.normal(jax.random.PRNGKey(0), (10, 8))
    key, sigma = jax.random.PRNGKey(1), jnp.float32(0.3)
    full = degrade(x, jnp.arange(10), key, sigma, "gaussian")
    idx = jnp.array([7, 2, 2, 9])
    batch = degrade(x[idx], idx, key, sigma, "gaussian")
    np.testing.assert_allclose(batch, full[idx], rtol=1e-6)  # same vector, same noise, in any batch
    np.testing.assert_allclose(jnp.linalg.norm(full, axis=-1), 1.0, rtol=1e-5)
    assert not np.allclose(degrade(x, jnp.arange(10), jax.random.PRNGKey(2), sigma, "gaussian"), full)


def test_levels_share_the_noise_direction():
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 8))
    idx, key = jnp.arange(5), jax.random.PRNGKey(1)
    z = jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), (8,)))(idx)
    for sigma in (0.1, 0.5):
        want = (x + sigma * z) / jnp.linalg.norm(x + sigma * z, axis=-1, keepdims=True)
        np.testing.assert_allclose(degrade(x, idx, key, jnp.float32(sigma), "gaussian"), want, rtol=1e-5)


def test_level_zero_is_the_features_as_they_are():
    """No rescaling at sigma 0, in a batch of runs at other levels too: x's norms here are far from 1."""
    x = 5.0 * jax.random.normal(jax.random.PRNGKey(0), (6, 8))
    idx, key = jnp.arange(6), jax.random.PRNGKey(1)
    np.testing.assert_array_equal(degrade(x, idx, key, jnp.float32(0.0), "gaussian"), x)
    runs = jax.vmap(lambda s: degrade(x, idx, key, s, "gaussian"))(jnp.float32([0.0, 0.2]))
    np.testing.assert_array_equal(runs[0], x)
    np.testing.assert_allclose(jnp.linalg.norm(runs[1], axis=-1), 1.0, rtol=1e-5)


def test_token_features_and_none():
    x = jax.random.normal(jax.random.PRNGKey(0), (3, 4, 8))
    y = degrade(x, jnp.arange(3), jax.random.PRNGKey(1), jnp.float32(0.2), "gaussian")
    assert y.shape == x.shape
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(degrade(x, jnp.arange(3), jax.random.PRNGKey(1), jnp.float32(0.2), "none"), x)
    # Each token draws its own noise: a vector repeated over its tokens comes out different at each.
    same = jnp.repeat(x[:, :1], 4, axis=1)
    y = np.asarray(degrade(same, jnp.arange(3), jax.random.PRNGKey(1), jnp.float32(0.2), "gaussian"))
    assert all(np.abs(y[:, 0] - y[:, t]).max() > 1e-3 for t in range(1, 4))


def test_an_unknown_kind_or_method_is_refused_not_passed_through():
    """A misspelt degradation kind would leave the features clean, a misspelt head would train something else."""
    from fusion_jax.fusion import make_head

    with pytest.raises(ValueError, match=r"unknown degradation kind 'gauss'; allowed: none, gaussian"):
        degrade(jnp.ones((2, 3)), jnp.arange(2), jax.random.PRNGKey(0), jnp.float32(0.1), "gauss")
    with pytest.raises(ValueError, match=r"unknown method 'late'; allowed: concat, cross"):
        make_head("late")
