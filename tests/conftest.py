"""8 fake CPU devices for every test, so each sharding path (data, fsdp, tensor, expert) runs.

One persistent compilation cache per pytest session (a fresh temporary folder, inherited by the xdist workers
and the subprocesses tests start, removed when the session ends): the many runs of the same tiny configs compile
once.
"""

import os
import shutil
import tempfile

# XLA's CPU fusion emitters off: the older emitters compile a tiny model's programs ~2x faster (a 2x2x2-mesh test's
# 12 programs: 7.0 -> 3.0 s), and compiling is most of what the tests do. Subprocesses inherit it (`cpu_env`).
FAST_COMPILE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 "
                           f"{FAST_COMPILE_XLA_FLAGS}").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Made by the process that starts the session (xdist's workers inherit the variable), removed by it at the end:
# ~80 MB a session, which had filled a disk after a thousand runs.
OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if OWN_COMPILATION_CACHE:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="beyond-jax-cache-")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# Tiny shapes, where compiling dominates: XLA's optimisations off (~35% faster), in the subprocesses tests start
# too; a test marked `optimised` (thousands of steps, or compiled-memory figures) turns them back on.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from experiments.configs import grokking, lm_shakespeare  # noqa: E402


def pytest_configure(config):
    assert jax.device_count() == 8, f"tests need 8 fake CPU devices, got {jax.devices()}"


def pytest_unconfigure(config):
    if OWN_COMPILATION_CACHE:
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


@pytest.fixture(autouse=True)
def _optimised_when_marked(request):
    """XLA's optimisations back on for a test marked `optimised` (they are off everywhere else: see above)."""
    if request.node.get_closest_marker("optimised") is None:
        yield
        return
    jax.config.update("jax_disable_most_optimizations", False)
    try:
        yield
    finally:
        jax.config.update("jax_disable_most_optimizations", True)


def cpu_env(devices: int = 8) -> dict:
    """The environment of a subprocess a test starts: this one's, with `devices` fake CPU devices."""
    return {**os.environ, "JAX_PLATFORMS": "cpu",
            "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE_XLA_FLAGS}"}


def slow(*values):
    """One parametrisation marked slow: the default suite keeps a representative of each path, the others
    run with `-m slow` (CI runs both)."""
    return pytest.param(*values, marks=pytest.mark.slow)


def set_any_value(config, path: str, value):
    """config[path] = value whatever its type (a ConfigDict is typed; a config file can still set any type)."""
    *parents, key = path.split(".")
    node = config
    for part in parents:
        node = node[part]
    with config.unlocked():
        if key in node:
            del node[key]
        node[key] = value
    return config


def make_tiny_config(steps: int = 6):
    """The grokking config shrunk to seconds: a+b mod 13, 2 layers of width 32, GQA (4 heads, 2 kv)."""
    config = grokking.get_config()
    config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_mlp=64, norm="rmsnorm",
                        positional="rope", activation="gelu")
    config.data.update(p=13, train_fraction=0.5, batch_size=16, eval_batch_size=32)
    config.train.update(steps=steps, log_every=1, eval_every=3, checkpoint_every=3)
    config.optimizer.update(lr=3e-3, warmup_steps=2)
    config.mesh.update(data=-1)
    return config


def make_tiny_lm_config(steps: int = 4):
    """The tiny-Shakespeare LM config shrunk to seconds: width 32, 2 layers, GQA (4 heads, 2 kv),
    context 16, batch 16; 1% of the text validates."""
    config = lm_shakespeare.get_config()
    config.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_mlp=64, scan_unroll=1)
    config.data.update(seq_len=16, batch_size=16, eval_batch_size=256, train_fraction=0.99)
    config.train.update(steps=steps, log_every=1, eval_every=steps, checkpoint_every=steps)
    config.optimizer.update(warmup_steps=2)
    config.mesh.update(data=-1)
    return config


@pytest.fixture(scope="session")
def finished_tiny_run(tmp_path_factory):
    """The workdir of `make_tiny_config(steps=6)` trained once per session (checkpoints at 3 and 6); tests read it
    or copy it, never change it."""
    from experiments.training import trainer

    workdir = tmp_path_factory.mktemp("finished_tiny_run") / "run"
    trainer.train_and_evaluate(make_tiny_config(steps=6), str(workdir), verbose=False)
    return workdir


def assert_mesh_run_matches_one_device(config_fn, tmp_path, **mesh_model_overrides):
    """Trains config_fn() on one device and on a data=2, fsdp=2, tensor=2 mesh (with `mesh_model_overrides` set in
    config.model there, e.g. a Pallas implementation) and asserts equal train / eval losses (rtol 2e-5) that fall."""
    from experiments.training import metrics_writer, trainer

    trainer.train_and_evaluate(config_fn(), str(tmp_path / "one"), devices=jax.devices()[:1], verbose=False)
    mesh_config = config_fn()
    mesh_config.mesh.update(data=2, fsdp=2, tensor=2)
    mesh_config.model.update(**mesh_model_overrides)
    trainer.train_and_evaluate(mesh_config, str(tmp_path / "mesh"), verbose=False)
    losses = lambda d: {(e["split"], e["step"]): e["loss"] for e in metrics_writer.read(str(d))}  # noqa: E731
    expected, got = losses(tmp_path / "one"), losses(tmp_path / "mesh")
    steps = mesh_config.train.steps
    assert expected.keys() == got.keys() and ("train", steps) in got
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=2e-5, err_msg=str(key))
    assert got[("train", steps)] < got[("train", 1)]


def decode_in_pieces(model, params, tokens, cache, pieces):
    """model.decode over consecutive chunks of `tokens` of the sizes in `pieces`, from `cache`: (logits of every
    position [B, sum(pieces), V], the cache after them)."""
    decode = jax.jit(lambda t, c, s: model.apply({"params": params}, t, c, s, method=model.decode))
    start, outputs = 0, []
    for size in pieces:
        logits, cache = decode(tokens[:, start:start + size], cache, start)
        outputs.append(logits)
        start += size
    return jnp.concatenate(outputs, 1), cache
