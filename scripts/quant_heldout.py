#!/usr/bin/env python
"""A quantization recipe's `validate` figures on the held-out prompts, with their spread, for the
recipe as built and for variants of it (measurement tool for choosing recipes and gates).

Each variant calibrates the trained tiny model as a build does (ModelOpt config from
`quant.ptq.modelopt_config`, the real decode loops over the calibration prompts), then runs
`validate` (the same comparison as the CLI) with the fake-quantized torch model as the engine
against the fp32 reference on the first N prompts of a prompt file (default: the committed held-out
set). Its figures equal the ONNX engine's up to float reduction order (tests/quant:
test_graph_computes_what_modelopt_calibrated). One JSON line per variant:

  per mode: pooled trajectory agreement and its spread over prompts (median, p10, min, share exact),
  teacher-forced token and commit agreement, mean KL(reference || engine), and per pass kind the
  logit cosine's min / p01 / p05 and the KL's mean / p99.

    OMP_NUM_THREADS=1 python scripts/quant_heldout.py fp8 int8 broken bf16 [--prompts F] [-n 200]

Variants: a recipe name (fp8, int8, int4-awq), "broken" (the test suite's deliberately broken
recipe), "bf16" (no quantization: the whole model in bfloat16, the floor set by rounding alone), or
NAME:KEY=VALUE,... with Recipe fields (e.g. fp8:algorithm=smoothquant, int8:algorithm=max,
fp8:exclude=diffusion_head;*o_proj) or the calibration options calib=FILE (prompt file),
calib_n=K (first K prompts of it), calib_tokens=T.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_PROMPTS = ROOT / "docs" / "prompts" / "tiny-heldout-200.txt"


def parse_variant(text: str):
    """'fp8:algorithm=smoothquant,calib_n=64' -> (recipe or None, calibration options)."""
    from nemodiff_compile.quant import recipe_for

    name, _, rest = text.partition(":")
    opts = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
    calib = {k: opts.pop(k) for k in ("calib", "calib_n") if k in opts}
    if name == "bf16":
        return None, calib
    if name == "broken":       # tests/quant: int4 per-channel weights, int8 activations, head quantized
        r = recipe_for("fp8").with_(weights="int4", weight_block=None, activations="int8", exclude=(),
                                    calib_max_new_tokens=16)
    else:
        r = recipe_for(name)
    fields = {}
    for k, v in opts.items():
        if k == "calib_tokens":
            k = "calib_max_new_tokens"
        cur = getattr(r, k)
        if isinstance(cur, tuple):
            fields[k] = tuple(x for x in v.split(";") if x)
        elif isinstance(cur, bool):
            fields[k] = v.lower() in ("1", "true", "yes")
        elif isinstance(cur, int) or (cur is None and v.isdigit()):
            fields[k] = int(v)
        elif isinstance(cur, float):
            fields[k] = float(v)
        else:
            fields[k] = None if v == "none" else v
    return r.with_(**fields).check(), calib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS)
    ap.add_argument("-n", type=int, default=200, help="first N prompts of --prompts")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--dump", type=Path, default=None,
                    help="also save per-prompt figures (torch.save) to DUMP/<variant>.pt, for subsampling")
    args = ap.parse_args()
    warnings.simplefilter("ignore")

    import torch
    import modelopt.torch.quantization as mtq

    from nemodiff_compile import checkpoint_folder, load_reference
    from nemodiff_compile.quant.calibration import decoding_loop
    from nemodiff_compile.model.tokenizer import load_tokenizer
    from nemodiff_compile.prompts import encode_prompts, read_prompt_file
    from nemodiff_compile.quant import calib, ptq
    from nemodiff_compile.backends.eager import TorchDenoiser
    from nemodiff_compile.validate.compare import validate

    torch.set_num_threads(1)
    ref = load_reference("tiny", dtype="float32")
    tok = load_tokenizer(checkpoint_folder("tiny"))
    items = read_prompt_file(args.prompts, "--prompts")[: args.n]
    prompts = encode_prompts(items, tok, ref.config, str(args.prompts))
    max_len = max(map(len, prompts)) + args.max_new_tokens + 2 * ref.config.block_size

    for text in args.variants:
        t0 = time.process_time()
        recipe, copts = parse_variant(text)
        if recipe is None:
            model = load_reference("tiny", dtype="bfloat16")
        else:
            model = copy.deepcopy(ref)
            citems = read_prompt_file(copts["calib"], "calib") if "calib" in copts else calib.read_prompts(None)
            if "calib_n" in copts:
                citems = citems[: int(copts["calib_n"])]
            cprompts = encode_prompts(citems, tok, ref.config, "calibration prompts")
            loop = decoding_loop(cprompts, recipe.calib_modes, recipe.calib_max_new_tokens, ref.config.block_size)
            mtq.quantize(model, ptq.modelopt_config(recipe, ptq.linear_names(model), ref.config.num_hidden_layers),
                         loop)
        report = validate(TorchDenoiser(ref, max_len, return_logits=True),
                          TorchDenoiser(model, max_len, return_logits=True), prompts,
                          max_new_tokens=args.max_new_tokens, batch=args.batch)
        if args.dump is not None:
            args.dump.mkdir(parents=True, exist_ok=True)
            torch.save(per_prompt(report, len(prompts)), args.dump / (text.replace("/", "_") + ".pt"))
        rep = report.to_json()
        out = dict(variant=text, prompts=len(prompts), source=args.prompts.name,
                   trajectory=round(rep["token_agreement"], 4), seconds=round(time.process_time() - t0, 1), modes={})
        for m, v in rep["per_mode"].items():
            ps = v["prompt_spread"]
            out["modes"][m] = dict(
                trajectory=round(v["token_agreement"], 4),
                prompts={k: ps[k] if k == "prompts" else round(ps[k], 4) for k in ("median", "p10", "p25", "min", "exact")},
                forced=round(v["forced_token_agreement"], 4),
                commit=None if v["commit_agreement"] is None else round(v["commit_agreement"], 4),
                kl=round(v["kl_mean"], 6), tpf_drop=round(v["tpf_drop"], 4),
                phases={ph: dict(cos_min=round(d["cosine"]["min"], 4), cos_p01=round(d["cosine"]["p01"], 4),
                                 cos_p05=round(d["cosine"]["p05"], 4), kl_mean=round(d["kl"]["mean"], 6),
                                 kl_p99=round(d["kl"]["p99"], 5), tok=round(d["token_agreement"], 4))
                        for ph, d in v["phases"].items()})
        print(json.dumps(out), flush=True)


def per_prompt(report, n: int) -> dict:
    """mode -> {"trajectory": [(matched, total)] per prompt, "phases": {phase: {"prompt", "cos", "kl",
    "tok"}}}: every compared position's prompt index, cosine and KL, and per pass the token matches."""
    import torch

    out = {}
    for name, m in report.modes.items():
        d = {"trajectory": list(zip(m.prompt_agreement, [1] * n)), "phases": {}}
        for p in m.passes:
            if p.divergence is None:
                continue
            ph = d["phases"].setdefault(p.phase, {"prompt": [], "cos": [], "kl": []})
            ph["prompt"].append(p.divergence["row"] + p.first_prompt)
            ph["cos"].append(p.divergence["cos"])
            ph["kl"].append(p.divergence["kl"])
        for ph in d["phases"].values():
            for k in ("prompt", "cos", "kl"):
                ph[k] = torch.cat(ph[k])
        out[name] = d
    return out


if __name__ == "__main__":
    main()
