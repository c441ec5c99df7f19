#!/usr/bin/env python
"""How far a quantized recipe's `validate` figures move under changes that should not matter.

Calibrates the tiny model with a recipe exactly as a build does (ModelOpt config from
`quant.ptq.modelopt_config`, the real decode loops over the built-in calibration prompts), then runs
`validate` (the same comparison as the CLI) on the fake-quantized torch model against the fp32
reference, for variants of the calibrated state:

  base              the recipe as built (matches the ONNX engine's `validate` figures)
  amax xF           every activation amax multiplied by F (a calibration that saw slightly
                    different data)
  float-act KIND    the activations of one projection kind kept float (weights stay quantized)

For each: trajectory agreement (pooled, per mode) on the built-in validation prompts and on a
held-out set of 16 prompts in the style of the training corpus, the teacher-forced token agreement,
and the mean teacher-forced KL(reference || engine) per position. Also prints, per quantized input,
the relative squared error the activation Q/DQ adds (E4M3's 3-bit mantissa gives ~7e-4 whatever the
scale) and the fractions of subnormal and clipped values. One JSON line per variant.

    OMP_NUM_THREADS=1 python scripts/quant_sensitivity.py [--precision fp8] [--amax 0.99,1.01] [--no-float-act]
"""

from __future__ import annotations

import argparse
import copy
import fnmatch
import json
import warnings

HELD_OUT = ("What is 6 + 2?", "Ben had a blue ball. One day,", "Count down from 20:", "Zoe and Max went to the beach.",
            "What color is grass?", "On Friday, Leo woke up early.", "Say it twice: red cup hat.",
            "Here is a story. Emma had a", "What is 10 - 3?", "It was a rainy day. Sara and Tom",
            "Count by twos from 4:", "Noah had a brown dog named Spot.", "How many legs does a dog have?",
            "Monday, Tuesday,", "Tell me a story about a duck.", "Anna wanted to swim. The first time,")
KINDS = {"qkv": ("*q_proj", "*k_proj", "*v_proj"), "o": ("*o_proj",), "gate_up": ("*gate_proj", "*up_proj"),
         "down": ("*down_proj",)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precision", default="fp8")
    ap.add_argument("--amax", default="0.98,0.99,1.01,1.02", help="activation amax factors to try")
    ap.add_argument("--no-float-act", action="store_true", help="skip the float-activation variants")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    import torch
    import modelopt.torch.quantization as mtq

    from nemodiff_compile import checkpoint_folder, load_reference
    from nemodiff_compile.model.tokenizer import encode_prompt, load_tokenizer
    from nemodiff_compile.quant import calib, ptq, recipe_for
    from nemodiff_compile.backends.eager import TorchDenoiser
    from nemodiff_compile.decoding import loops
    from nemodiff_compile.validate import metrics
    from nemodiff_compile.validate.compare import validate
    from nemodiff_compile.prompts import builtin_prompts

    recipe = recipe_for(args.precision)
    ref = load_reference("tiny", dtype=recipe.float_dtype)
    tok = load_tokenizer(checkpoint_folder("tiny"))
    val_prompts = builtin_prompts(tok, ref.config, 4)
    held = [encode_prompt(tok, t, chat=i % 2 == 0) for i, t in enumerate(HELD_OUT)]

    model = copy.deepcopy(ref)
    names = ptq.linear_names(model)
    prompts = calib.encode_prompts(calib.read_prompts(None), tok, ref.config, "built-in prompts")
    mtq.quantize(model, ptq.modelopt_config(recipe, names, ref.config.num_hidden_layers),
                 calib.decoding_loop(prompts, recipe.calib_modes, recipe.calib_max_new_tokens, ref.config.block_size))
    inputs = {n[: -len(".input_quantizer")]: q for n, q in model.named_modules()
              if n.endswith(".input_quantizer") and q.is_enabled}

    kl = [0.0, 0]
    plain = metrics.logits_metrics

    def with_kl(e, r, valid, *a, **k):                     # teacher-forced KL, accumulated per position
        le, lr = torch.log_softmax(e.float(), -1), torch.log_softmax(r.float(), -1)
        kl[0] += float((lr.exp() * (lr - le)).sum(-1)[valid].sum())
        kl[1] += int(valid.sum())
        return plain(e, r, valid, *a, **k)

    metrics.logits_metrics = with_kl

    def figures(ps) -> dict:
        kl[:] = [0.0, 0]
        rep = validate(TorchDenoiser(ref, 256, return_logits=True), TorchDenoiser(model, 256, return_logits=True),
                       ps, modes=loops.MODES, max_new_tokens=32).to_json()
        pm = rep["per_mode"]
        return dict(trajectory=round(rep["token_agreement"], 4),
                    per_mode={k: round(v["token_agreement"], 4) for k, v in pm.items()},
                    per_prompt={k: [round(a, 3) for a in v["prompt_agreement"]] for k, v in pm.items()} if ps is val_prompts else None,
                    forced_min=round(min(v["forced_token_agreement"] for v in pm.values()), 4),
                    kl=round(kl[0] / max(kl[1], 1), 6))

    def report(variant: str) -> None:
        print(json.dumps(dict(variant=variant, validation_prompts=figures(val_prompts), held_out=figures(held))),
              flush=True)

    error_stats(model, inputs, ref, held + val_prompts, TorchDenoiser, loops, torch)
    report("base")
    base = {n: q.amax.clone() for n, q in inputs.items()}
    for f in (float(x) for x in args.amax.split(",") if x):
        for n, q in inputs.items():
            q.amax = base[n] * f
        report(f"amax x{f}")
    for n, q in inputs.items():
        q.amax = base[n]
    if not args.no_float_act:
        for kind, pats in KINDS.items():
            chosen = [q for n, q in inputs.items() if any(fnmatch.fnmatchcase(n, p) for p in pats)]
            for q in chosen:
                q.disable()
            report(f"float-act {kind}")
            for q in chosen:
                q.enable()


def error_stats(model, inputs, ref, prompts, TorchDenoiser, loops, torch) -> None:
    """Per quantized input over the decode loops: relative squared error of the activation Q/DQ
    (E4M3, amax / 448), fraction below the smallest normal, fraction above amax."""
    acc: dict[str, list[float]] = {}

    def hook(name, q):
        def pre(_mod, inp):
            x = inp[0].detach().float().flatten()
            s = float(q.amax) / 448.0
            xq = (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).float() * s
            a = acc.setdefault(name, [0.0, 0.0, 0.0, 0])
            a[0] += float(((xq - x) ** 2).sum() / (x ** 2).sum().clamp_min(1e-30))
            a[1] += float((x.abs() < s * 2 ** -6).float().mean())
            a[2] += float((x.abs() > float(q.amax)).float().mean())
            a[3] += 1
        return pre

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n, q)) for n, q in inputs.items()]
    den = TorchDenoiser(model, 256)
    for mode in loops.MODES:
        loops.generate(den, prompts, mode, max_new_tokens=32)
    for h in handles:
        h.remove()
    for n, (e, sub, clip, k) in acc.items():
        print(json.dumps(dict(input=n, rel_sq_error=round(e / k, 6), subnormal=round(sub / k, 4),
                              clipped=round(clip / k, 6))))


if __name__ == "__main__":
    main()
