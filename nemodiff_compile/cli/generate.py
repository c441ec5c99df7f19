"""`nemodiff-compile generate`: decode with the PyTorch reference in any of the three modes."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ._common import model_source, resolve_source, user_errors

# Prompts for the demo when none is given (the tiny model was trained on this kind of text).
DEMO_PROMPTS = ("Once upon a time, Mia", "What is 3 + 4?")


@click.command()
@model_source
@click.option("--engine", type=click.Path(path_type=Path), default=None,
              help="Run a built engine directory instead of the PyTorch reference.")
@click.option("--prompt", "prompts", multiple=True, help="Prompt text; repeat for a batch.")
@click.option("--prompt-ids", "prompt_ids", multiple=True,
              help="Prompt as comma-separated token ids (for checkpoints without a tokenizer); repeatable.")
@click.option("--mode", type=click.Choice(["ar", "dlm", "linear-spec"]), default="dlm", show_default=True)
# bounds: decoding/policy.check_bounds (the Python API's, with the flags' names), not click's ranges
@click.option("--max-new-tokens", default=64, show_default=True, type=int, help="At least 1.")
@click.option("--block-length", type=int, default=None, help="At least 2. Default: the config's block_size.")
@click.option("--threshold", type=float, default=None,
              help="Commit threshold in [0, 1] (dlm default 0.9; linear-spec draft default 0 = one draft pass).")
@click.option("--steps", type=int, default=None,
              help="dlm: fixed passes per block (LLaDA schedule, at least 1) instead of the threshold rule.")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="At least 0 (0: greedy).")
@click.option("--seed", default=0, show_default=True)
@click.option("--chat/--raw", default=True, show_default=True,
              help="Wrap the prompt in the tokenizer's chat template (when it has one).")
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None,
              help="Reference only. Default: the checkpoint's dtype.")
@click.option("--lora", type=click.Choice(["toggle", "merge", "off"]), default=None,
              help="Reference only. Draft LoRA (linear_spec_lora/): on for drafts only (toggle), "
                   "folded in (merge), or unused.")
@click.option("--thinking/--no-thinking", default=None,
              help="Instruct models: the chat template's thinking switch (enable_thinking). "
                   "Default: the checkpoint's generation_config.json, else off.")
@click.option("--max-thinking-tokens", type=click.IntRange(min=0), default=None,
              help="Thinking budget: after this many generated tokens the closing </think> is forced "
                   "(needs thinking on). Default: the checkpoint's generation_config.json, else none.")
@click.option("--image", "images", multiple=True, type=click.Path(path_type=Path),
              help="Vision-language models: an image file for the prompt (repeatable; every prompt gets them). "
                   "Placed where the prompt writes <|image_start|>, else before its text.")
@click.option("--image-prefill", type=click.Choice(["causal", "bidirectional"]), default="causal", show_default=True,
              help="Reference only. How the image span is prefilled: causal like the text (an unverified "
                   "assumption about the released model) or bidirectional within each image's span.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def generate(model, size, random_weights, engine, prompts, prompt_ids, mode, max_new_tokens, block_length, threshold,
             steps, temperature, seed, chat, dtype, lora, thinking, max_thinking_tokens, images, image_prefill,
             as_json):
    """Generate text in AR, block-diffusion or linear self-speculation mode, with the PyTorch
    reference (default) or a built engine (--engine)."""
    from ..decoding.arguments import check_room, check_token_ids
    from ..decoding.policy import CLI, DecodePolicy, check_bounds
    from ..errors import NemodiffError

    check_bounds(max_new_tokens=max_new_tokens, block_length=block_length, steps=steps, threshold=threshold,
                 temperature=temperature, seed=seed, names=CLI)
    policy = DecodePolicy(mode, block_length=block_length, threshold=threshold, steps=steps,
                          temperature=temperature, seed=seed)                 # checked before anything loads
    if engine is not None and (model is not None or size is not None or random_weights):
        raise NemodiffError("--engine runs a built engine: drop --model/--size")
    ids = [_parse_ids(s) for s in prompt_ids]
    if engine is not None and image_prefill != "causal":
        raise NemodiffError("--image-prefill bidirectional: the reference only (engines prefill causally)")
    session = _open(engine, model, size, random_weights, dtype, lora, seed)
    session.image_prefill = image_prefill
    with session:
        from ..model.generation_config import thinking_setup

        template_kwargs, budget = thinking_setup(session.tokenizer, session.defaults, thinking, max_thinking_tokens)
        vocab = session.config.vocab_size
        ids = [check_token_ids(p, vocab, f"--prompt-ids {text}") for p, text in zip(ids, prompt_ids)]
        if prompts or not ids:
            if session.tokenizer is None:
                raise NemodiffError("this model has no tokenizer; pass --prompt-ids instead of --prompt")
            texts = list(prompts or DEMO_PROMPTS)
            if images:          # ids with the image spans expanded, and each prompt's image features
                prepared = [session.prepare(t, [str(i) for i in images], chat, **template_kwargs) for t in texts]
                ids += [i for i, _ in prepared]
            else:
                ids += [session.encode(t, chat, **template_kwargs) for t in texts]
        elif images:
            raise NemodiffError("--image: goes with --prompt (text), not --prompt-ids")
        image_feats = None if not images else [None] * len(prompt_ids) + [pi for _, pi in prepared]
        policy = policy.resolve(session.config)
        blen = policy.block_length or session.config.block_size
        if engine is None:        # size the reference's cache to the request (an engine's is its bucket)
            session.denoiser.max_len = max(map(len, ids)) + max_new_tokens + 2 * blen
        check_room(max(map(len, ids)), mode=mode, max_new_tokens=max_new_tokens, block_length=blen,
                   max_len=session.denoiser.max_len, names=CLI,
                   backend=f"the engine {engine}" if engine is not None else "the reference")
        start = time.perf_counter()
        result = session.generate(ids, policy=policy, max_new_tokens=max_new_tokens,
                                  enable_thinking=thinking, max_thinking_tokens=max_thinking_tokens,
                                  images=image_feats)
        seconds = time.perf_counter() - start
    g = result.generation
    n_tokens = sum(len(t) for t in g.tokens)
    rows = [{"prompt_ids": p, "tokens": c.tokens, "finish": c.finish, "text": c.text}
            for p, c in zip(ids, result.completions)]
    report = {"backend": "reference" if engine is None else str(engine), "mode": mode, "results": rows,
              "nfe": g.nfe, "nfe_by_phase": g.nfe_by_phase,
              "row_nfe": g.row_nfe, "tokens_per_forward": round(g.tokens_per_forward, 4),
              "generated_tokens": n_tokens, "seconds": round(seconds, 4),
              "tokens_per_second": round(n_tokens / seconds, 2) if seconds > 0 else None,
              "block_length": blen, "threshold": threshold, "steps": steps, "temperature": temperature,
              "enable_thinking": template_kwargs["enable_thinking"],
              "max_thinking_tokens": budget.max_tokens if budget else None,
              "images": [str(i) for i in images], "image_prefill": image_prefill if images else None}
    if as_json:
        click.echo(json.dumps(report))
        return
    for r in rows:
        click.echo(r["text"] if r["text"] is not None else " ".join(map(str, r["tokens"])))
        click.echo("---")
    click.echo(f"mode {mode}: {n_tokens} tokens, NFE {g.nfe} {g.nfe_by_phase}, "
               f"tokens/forward {g.tokens_per_forward:.2f}, {report['tokens_per_second']} tokens/s", err=True)


def _open(engine, model, size, random_weights, dtype, lora, seed):
    """A Session over the engine directory, or over the eager reference of --model/--size."""
    from ..session import Session

    if engine is not None:
        return Session.open(engine)
    from .. import checkpoint_folder, load_reference
    from ..model.tokenizer import load_tokenizer
    from ..backends.eager import TorchDenoiser

    from ..model.generation_config import GenerationDefaults

    source = resolve_source(model, size, random_weights)
    folder = checkpoint_folder(source)
    tok = load_tokenizer(folder) if folder and (folder / "tokenizer.json").is_file() else None
    model = load_reference(source, dtype=dtype, seed=seed, lora=lora)
    return Session(TorchDenoiser(model, max_len=model.config.max_position_embeddings), tok,
                   defaults=GenerationDefaults.read(folder))


def _parse_ids(text: str) -> list[int]:
    from ..errors import NemodiffError

    try:
        ids = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise NemodiffError(f"--prompt-ids {text!r}: expected comma-separated integers") from None
    if not ids:
        raise NemodiffError("--prompt-ids: empty prompt")
    return ids
