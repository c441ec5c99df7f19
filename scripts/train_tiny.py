#!/usr/bin/env python
"""Train the embedded tiny Nemotron-Labs-Diffusion model on CPU and write it as a checkpoint folder.

    python scripts/train_tiny.py                      # corpus -> tokenizer -> train -> save -> evaluate
    python scripts/train_tiny.py --eval-only          # evaluate the checkpoint already in --out

Writes to --out (default nemodiff_compile/assets/tiny/): config.json, model.safetensors (fp32),
tokenizer.json, tokenizer_config.json, special_tokens_map.json, generation_config.json and
train_log.json (arguments, loss curve, evaluation numbers). Deterministic for a given seed, step
count and thread count.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))            # tinylm/ (the corpus and training code) is not installed

from nemodiff_compile.config import PRESETS, ModelConfig  # noqa: E402
from nemodiff_compile.model import NemotronLabsDiffusion  # noqa: E402
from tinylm import corpus  # noqa: E402
from tinylm.evaluate import diffusion_decode, greedy_ar  # noqa: E402
from tinylm.tokenizer import build_tokenizer, save_tokenizer  # noqa: E402
from tinylm.train import TrainArgs, init_weights, pack_stream, train  # noqa: E402

DEFAULT_OUT = REPO / "nemodiff_compile" / "assets" / "tiny"

TEXT_PROMPTS = ["Once upon a time, Tom", "Lily had a", "Count from 5:", "3 + 4 =",
                "The days of the week are", "Q: What does a cow say? A:"]
CHAT_PROMPTS = ["Tell me a story about a dog.", "What is 2 + 5?", "Count from 12.",
                "List the months of the year.", "What is the capital of France?", "Hello!"]


def generation_config(cfg: ModelConfig) -> dict:
    return {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
            "pad_token_id": cfg.pad_token_id, "mask_token_id": cfg.mask_token_id,
            "do_sample": False, "max_new_tokens": 128, "block_length": cfg.block_size,
            "threshold": 0.9}


def load(out: Path) -> NemotronLabsDiffusion:
    from safetensors.torch import load_file

    model = NemotronLabsDiffusion(ModelConfig.from_file(out / "config.json"))
    model.load_state_dict(load_file(out / "model.safetensors"))
    return model.eval()


def evaluate(model, out: Path, print_fn=print) -> dict:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)  # config.json has auto_map
    cfg = model.config
    prompts = [(p, tok(p)["input_ids"]) for p in TEXT_PROMPTS]
    prompts += [(f"[chat] {m}", tok.apply_chat_template([{"role": "user", "content": m}],
                                                         add_generation_prompt=True, tokenize=True)["input_ids"])
                for m in CHAT_PROMPTS]
    res = {"ar": [], "diffusion": []}
    print_fn("\n== greedy AR ==")
    for name, ids in prompts:
        new = greedy_ar(model, ids, 80, cfg.eos_token_id)
        text = tok.decode(new, skip_special_tokens=True)
        res["ar"].append({"prompt": name, "output": text})
        print_fn(f"{name!r} -> {text!r}")
    print_fn(f"\n== block diffusion (block {cfg.block_size}, threshold 0.9) ==")
    tot = {"conf": 0, "masked": 0, "committed": 0, "passes": 0, "tokens": 0, "nfe": 0}
    for name, ids in prompts:
        st = diffusion_decode(model, ids, max_blocks=5, block=cfg.block_size, mask_id=cfg.mask_token_id,
                              eos=cfg.eos_token_id, threshold=0.9)
        text = tok.decode(st.tokens, skip_special_tokens=True)
        res["diffusion"].append({"prompt": name, "output": text, "tokens": len(st.tokens), "nfe": st.nfe,
                                 "first_pass_confident": st.first_pass_confident,
                                 "denoise_passes": st.denoise_passes})
        print_fn(f"{name!r} -> {text!r}\n    first-pass >=0.9: {st.first_pass_confident} of "
                 f"{st.first_pass_masked}  denoise passes/block {st.denoise_passes}  "
                 f"tokens/denoise-pass {st.tokens_per_denoise_pass:.2f}  TPF {st.tokens_per_forward:.2f}")
        tot["conf"] += sum(st.first_pass_confident); tot["masked"] += sum(st.first_pass_masked)
        tot["committed"] += sum(st.committed_per_pass); tot["passes"] += len(st.committed_per_pass)
        tot["tokens"] += len(st.tokens); tot["nfe"] += st.nfe
    res["summary"] = {
        "first_pass_confident_frac": tot["conf"] / max(1, tot["masked"]),
        "tokens_per_denoise_pass": tot["committed"] / max(1, tot["passes"]),
        "tokens_per_forward": tot["tokens"] / max(1, tot["nfe"]),
    }
    print_fn("summary: " + json.dumps(res["summary"]))
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    d = TrainArgs()
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--steps", type=int, default=d.steps)
    ap.add_argument("--batch", type=int, default=d.batch)
    ap.add_argument("--seq-len", type=int, default=d.seq_len)
    ap.add_argument("--lr", type=float, default=d.lr)
    ap.add_argument("--warmup", type=int, default=d.warmup)
    ap.add_argument("--alpha", type=float, default=d.alpha, help="weight of the diffusion loss")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokenizer-docs", type=int, default=20000)
    ap.add_argument("--eval-only", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    if a.eval_only:
        evaluate(load(a.out), a.out)
        return 0

    t_start = time.time()
    cfg = PRESETS["tiny"]
    targs = TrainArgs(steps=a.steps, batch=a.batch, seq_len=a.seq_len, lr=a.lr, warmup=a.warmup,
                      alpha=a.alpha, seed=a.seed)
    print(f"tiny preset: {cfg.num_parameters() / 1e6:.2f}M parameters; {targs}")

    tok = build_tokenizer(corpus.make_corpus(a.tokenizer_docs, a.seed), cfg.vocab_size)
    stream, doc_ids = pack_stream(tok, corpus.iter_documents(a.seed), a.steps * a.batch * a.seq_len,
                                  seed=a.seed)
    print(f"tokenizer + {stream.numel()} training tokens in {time.time() - t_start:.1f}s")

    torch.manual_seed(a.seed)
    model = NemotronLabsDiffusion(cfg)
    init_weights(model, a.seed)
    log = train(model, stream, doc_ids, targs)
    print(f"trained {a.steps} steps in {log.seconds:.0f}s")

    from nemodiff_compile.model.checkpoint import save_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        files = save_tokenizer(tok, tmp, model_max_length=cfg.max_position_embeddings)
        gen = Path(tmp) / "generation_config.json"
        gen.write_text(json.dumps(generation_config(cfg), indent=2) + "\n")
        files["generation_config.json"] = gen
        save_checkpoint(model, a.out, dtype="float32", extra_files=files)
    results = evaluate(model, a.out)
    record = {"args": vars(targs), "train_seconds": log.seconds, "total_seconds": time.time() - t_start,
              "threads": a.threads, "torch": torch.__version__, "loss_curve": log.rows,
              "eval_summary": results["summary"]}
    (a.out / "train_log.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {a.out} in {time.time() - t_start:.0f}s total")
    return 0


if __name__ == "__main__":
    sys.exit(main())
