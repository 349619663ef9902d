"""Feature dashboards of a trained sparse autoencoder: for each chosen latent a static HTML page and a PNG,

    top-activating contexts   the model's inputs around the rows where the latent fires most, each token shaded by
                              the latent's activation there
    activation histogram      of the latent's nonzero activations, with its firing frequency
    top logit effects         the tokens its decoder direction promotes and suppresses along the direct path: the
                              direction (mlp_hidden: times the MLP's output matrix) read through the logit lens,
                              lens(d) - lens(0)

and `index.html` listing the latents (frequency, largest activation, top promoted tokens).

    python -m experiments.analysis.sae_dashboard --workdir=SAE_RUN --out=DIR [--latents=16] [--latent_ids=3,17]
        [--split=eval] [--batches=16] [--batch_size=64] [--contexts=12]

Without --latent_ids, the `latents` most frequent on the split.
"""

import html
import json
import os

from absl import app, flags, logging
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from data import text  # noqa: E402
from experiments.analysis import activations, sae_eval  # noqa: E402
from experiments.training import cli, plots  # noqa: E402

WINDOW = 24  # tokens of context shown before the firing token


def token_texts(lm_config) -> list[str]:
    """How each token id prints: a byte-level model's characters, a modular-arithmetic model's numbers and `=`."""
    vocab = lm_config.model.vocab_size
    if lm_config.data.name == "text":
        tok = text.tokenizer_for(lm_config.data)
        return [tok.decode([i]) if lm_config.data.tokenizer != "byte" else chr(i) if 32 <= i < 127 else f"\\x{i:02x}"
                for i in range(vocab)]
    if lm_config.data.name == "algorithmic":
        return [str(i) for i in range(lm_config.data.p)] + ["="] * (vocab - lm_config.data.p)
    return [str(i) for i in range(vocab)]


def latent_activations(model, variables, reconstruct_latents, examples, layer, site, position, batch_size, batches):
    """f [N, T', M] of the SAE's latents on the split's first batches (T' = 1 for a store at one position)."""
    layer_of = jax.jit(lambda tokens: activations.capture(model, variables, tokens)[2][layer][site])
    out = []
    for start in range(0, min(len(examples["inputs"]), batch_size * batches), batch_size):
        x = layer_of(jnp.asarray(examples["inputs"][start:start + batch_size]))
        x = x if position is None else x[:, position:position + 1 or None]
        out.append(np.asarray(reconstruct_latents(x.reshape(-1, x.shape[-1])).reshape(*x.shape[:2], -1)))
    return np.concatenate(out)


def logit_effects(model, variables, layer: int, site: str, directions):
    """[n, V]: the direct effect on the logits of adding each of `directions` [n, D] at `site` after `layer`, through
    the logit lens (one pass for all of them)."""
    if site == "mlp_hidden":
        _, sown = jax.eval_shape(lambda t: activations.capture_tree(model, variables, t), jnp.zeros((1, 1), jnp.int32))
        stack, member, unit = activations.layer_paths(sown)[layer]
        params = variables["params"][stack] if member is None else variables["params"][stack][member]
        directions = directions @ params["mlp"]["wo"]["kernel"][unit]
    lens = lambda d: model.apply(variables, d[:, None], method=model.lens_logits)[:, 0]  # noqa: E731
    return np.asarray(lens(directions) - lens(jnp.zeros_like(directions[:1])))


def top_contexts(acts, tokens, latent: int, count: int, position):
    """[(example, t, [(token, activation)...])]: the `count` rows where `latent` is largest."""
    values = acts[..., latent]
    order = np.argsort(-values, axis=None)[:count]
    found = []
    for flat in order:
        n, t = np.unravel_index(flat, values.shape)
        if values[n, t] <= 0:
            break
        at = t if position is None else position % tokens.shape[1]
        first = max(0, at - WINDOW + 1)
        shades = values[n] if position is None else np.where(np.arange(tokens.shape[1]) == at, values[n, t], 0.0)
        found.append((int(n), int(at), [(int(tokens[n, i]), float(shades[i])) for i in range(first, at + 1)]))
    return found


def _context_html(context, texts, top: float) -> str:
    spans = []
    for token, value in context:
        alpha = 0.0 if top <= 0 else min(max(value / top, 0.0), 1.0)
        spans.append(f'<span title="{value:.3f}" style="background: rgba(255,120,0,{alpha:.2f})">'
                     f"{html.escape(texts[token]).replace(' ', '&nbsp;')}</span>")
    return "".join(spans)


def write_latent_page(out: str, latent: int, acts, contexts, effects, texts, title: str) -> dict:
    values = acts[..., latent].ravel()
    nonzero = values[values != 0]
    frequency = float(len(nonzero) / len(values))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
    axes[0].hist(nonzero, bins=40, color="tab:orange")
    axes[0].set(title=f"latent {latent}: fires on {100 * frequency:.2f}% of rows", xlabel="activation", ylabel="rows")
    order = np.argsort(effects)
    picked = np.concatenate([order[:8], order[-8:]])
    axes[1].barh(range(len(picked)), effects[picked], color=["tab:blue"] * 8 + ["tab:red"] * 8)
    axes[1].set_yticks(range(len(picked)), [repr(texts[i])[1:-1] for i in picked], fontsize=7)
    axes[1].set(title="direct logit effect", xlabel="logit change per unit activation")
    plots.save_figure(fig, os.path.join(out, f"latent_{latent}.png"), dpi=100)
    top = max((v for c in contexts for _, v in c[2]), default=0.0)
    rows = "".join(f"<tr><td>{n}</td><td>{t}</td><td class=c>{_context_html(c, texts, top)}</td></tr>"
                   for n, t, c in contexts)
    promoted = ", ".join(html.escape(repr(texts[i])) for i in order[::-1][:8])
    suppressed = ", ".join(html.escape(repr(texts[i])) for i in order[:8])
    page = (f"<html><head><meta charset=utf-8><title>{html.escape(title)}: latent {latent}</title><style>"
            "body{font-family:sans-serif} td.c{font-family:monospace;white-space:pre}</style></head><body>"
            f"<h2>{html.escape(title)}: latent {latent}</h2><p><a href=index.html>index</a></p>"
            f"<p>fires on {100 * frequency:.2f}% of rows; max activation {float(values.max()):.3f}</p>"
            f"<p>promotes: {promoted}<br>suppresses: {suppressed}</p>"
            f"<img src=latent_{latent}.png><h3>top-activating contexts</h3>"
            f"<table><tr><th>example</th><th>position</th><th>context</th></tr>{rows}</table></body></html>")
    with open(os.path.join(out, f"latent_{latent}.html"), "w") as f:
        f.write(page)
    return {"latent": latent, "frequency": frequency, "max": float(values.max()),
            "promotes": [texts[i] for i in order[::-1][:5]]}


def write_index(out: str, summaries: list[dict], title: str) -> None:
    rows = "".join(f"<tr><td><a href=latent_{s['latent']}.html>{s['latent']}</a></td><td>{100 * s['frequency']:.2f}%"
                   f"</td><td>{s['max']:.3f}</td><td>{html.escape(', '.join(map(repr, s['promotes'])))}</td></tr>"
                   for s in summaries)
    with open(os.path.join(out, "index.html"), "w") as f:
        f.write(f"<html><head><meta charset=utf-8><title>{html.escape(title)}</title></head><body style="
                f"'font-family:sans-serif'><h2>{html.escape(title)}</h2><table><tr><th>latent</th><th>fires on</th>"
                f"<th>max</th><th>promotes</th></tr>{rows}</table></body></html>")


def write_dashboards(sae_workdir: str, out: str, latents: int = 16, latent_ids=None, split: str = "eval",
                     batches: int = 16, batch_size: int = 64, contexts: int = 12) -> list[dict]:
    """Writes the pages of the chosen latents and the index into `out`; returns their summaries."""
    sae_config, sae_model, sae_variables, store, lm_config, model, variables, examples = sae_eval.load_run(
        sae_workdir, split)
    encode = jax.jit(lambda x: sae_model.apply(sae_variables, x, method=sae_model.encode))
    layer, site, position = store["layer"], store["site"], store.get("position")
    acts = latent_activations(model, variables, encode, examples, layer, site, position, batch_size, batches)
    if latent_ids is None:
        latent_ids = [int(i) for i in np.argsort(-np.mean(acts != 0, axis=(0, 1)))[:latents]]
    decoder = sae_model.apply(sae_variables, method=sae_model.decoder)
    texts, tokens = token_texts(lm_config), examples["inputs"][:len(acts)]
    title = f"SAE {os.path.basename(os.path.abspath(sae_workdir))} ({sae_config.model.kind}, {site} of layer {layer})"
    os.makedirs(out, exist_ok=True)
    effects = logit_effects(model, variables, layer, site, decoder[np.asarray(latent_ids)])
    summaries = [write_latent_page(out, i, acts, top_contexts(acts, tokens, i, contexts, position), effect, texts,
                                   title) for i, effect in zip(latent_ids, effects)]
    write_index(out, summaries, title)
    return summaries


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    args = flags.FLAGS
    ids = [int(i) for i in args.latent_ids.split(",")] if args.latent_ids else None
    try:
        summaries = write_dashboards(args.workdir, args.out, args.latents, ids, args.split, args.batches,
                                     args.batch_size, args.contexts)
    except (FileNotFoundError, ValueError, KeyError) as e:
        cli.fail(str(e))
    print(json.dumps({"out": args.out, "latents": [s["latent"] for s in summaries]}))


if __name__ == "__main__":  # the flags exist only for the command
    flags.DEFINE_string("workdir", None, "An SAE's run folder.", required=True)
    flags.DEFINE_string("out", None, "The dashboards' folder.", required=True)
    flags.DEFINE_integer("latents", 16, "How many latents (the most frequent), without --latent_ids.")
    flags.DEFINE_string("latent_ids", "", "Comma-separated latents to show.")
    flags.DEFINE_string("split", "eval", "The language model's split.")
    flags.DEFINE_integer("batches", 16, "Batches of the split read.")
    flags.DEFINE_integer("batch_size", 64, "Examples per batch.")
    flags.DEFINE_integer("contexts", 12, "Top-activating contexts per latent.")
    app.run(main)
