"""Command line: perplexity (+ passkey) of KV-cache configs on one text, as a table.

    python -m kvpass.evaluate --text novel.txt --configs bf16,kivi-b2-g32-r128,naive-b2
    python benchmarks/quality.py --out benchmarks/results

Writes quality.md and quality.csv into --out (and prints the markdown).
"""
from __future__ import annotations

import argparse
import csv
import sys
import time
import traceback
from pathlib import Path

import torch

from kvpass.evaluate.configs import EvalConfig, default_config_names, make_config
from kvpass.evaluate.model import load_model
from kvpass.evaluate.passkey import passkey
from kvpass.evaluate.perplexity import perplexity

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "texts" / "emma.txt"


def _int_list(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="kvpass-eval", description=__doc__.splitlines()[0])
    p.add_argument("--start-char", type=int, default=0,
                   help="skip this many characters of the text (the issue's protocol: Emma from 30000)")
    p.add_argument("--text", type=Path, default=None,
                   help=f"text file to score (default: {DEFAULT_TEXT} when present)")
    p.add_argument("--model", default="default",
                   help="local model dir, or 'default' for SmolLM2-135M-Instruct")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model compute dtype (weights are bf16; fp32 math is the CPU default)")
    p.add_argument("--tokens", type=int, default=1024, help="scored tokens")
    p.add_argument("--prefix", type=int, default=512, help="prompt tokens prefilled at once")
    p.add_argument("--chunk", type=int, default=1, help="tokens per decode step")
    p.add_argument("--configs", default=",".join(default_config_names()),
                   help="comma-separated config names (see kvpass.evaluate.configs)")
    p.add_argument("--passkey", action=argparse.BooleanOptionalAction, default=True,
                   help="also run passkey retrieval (slow on CPU: long prefills)")
    p.add_argument("--passkey-lengths", type=_int_list, default=(1000, 2000, 4000, 7000))
    p.add_argument("--passkey-trials", type=int, default=1, help="trials per length and depth")
    p.add_argument("--out", type=Path, default=None, help="directory for quality.md / .csv")
    return p.parse_args(argv)


def _load_text(path: Path | None) -> str:
    if path is None:
        if not DEFAULT_TEXT.is_file():
            raise SystemExit(f"no --text given and the default {DEFAULT_TEXT} is missing; "
                             f"pass --text FILE (any long plain-text file, e.g. a novel)")
        path = DEFAULT_TEXT
    return path.read_text(encoding="utf-8")


def run_config(cfg: EvalConfig, model, tok, ids, args) -> dict:
    """Measure one config; errors are recorded in the row rather than aborting the table."""
    row = {"config": cfg.name, "description": cfg.description, "ppl": "", "passkey": "",
           "seconds": "", "note": cfg.skip_reason}
    if cfg.skip_reason:
        return row
    t0 = time.perf_counter()
    try:
        ppl = perplexity(model, ids, backend=cfg.backend, prefix=args.prefix,
                         chunk=args.chunk, cache_factory=cfg.cache_factory)
        row["ppl"] = f"{ppl:.3f}"
        if args.passkey:
            hits = passkey(model, tok, backend=cfg.backend, cache_factory=cfg.cache_factory,
                           lengths=args.passkey_lengths, trials=args.passkey_trials)
            per = 3 * args.passkey_trials
            row["passkey"] = " ".join(f"{n}:{h}/{per}" for n, h in hits.items())
    except Exception as err:  # noqa: BLE001 -- one failing config must not lose the others
        traceback.print_exc()
        msg = " ".join(str(err).split())  # one line: the table cell and csv stay intact
        row["note"] = f"error: {type(err).__name__}: {msg}"[:400]
    row["seconds"] = f"{time.perf_counter() - t0:.1f}"
    return row


def to_markdown(rows, args, n_text_tokens: int) -> str:
    model_label = ("SmolLM2-135M-Instruct (bf16 weights)" if args.model in (None, "", "default")
                   else args.model)
    fp = next((float(r["ppl"]) for r in rows if r["config"] in ("bf16", "fp") and r["ppl"]), None)
    lines = [f"# KV-cache quality\n",
             f"Model {model_label}, math {args.dtype}. Perplexity over "
             f"{args.tokens} tokens after a {args.prefix}-token prefill, teacher-forced through "
             f"the decode path ({args.chunk} token/step); text {n_text_tokens} tokens available. "
             f"'bf16' is the uncompressed cache ({args.dtype} math here).\n",
             "| config | description | ppl | vs uncompressed | passkey | time (s) | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        rel = f"{(float(r['ppl']) / fp - 1) * 100:+.1f}%" if fp and r["ppl"] else ""
        lines.append(f"| {r['config']} | {r['description']} | {r['ppl']} | {rel} | "
                     f"{r['passkey']} | {r['seconds']} | {r['note'].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main_eval(argv=None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    text = _load_text(args.text)[args.start_char:]
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype)
    all_ids = tok(text, return_tensors="pt").input_ids                # [1, T]
    need = args.prefix + args.tokens
    if all_ids.shape[1] < need:
        raise SystemExit(f"text has {all_ids.shape[1]} tokens, need prefix+tokens = {need}")
    ids = all_ids[:, :need]                                          # [1, prefix+tokens]
    rows = []
    for name in [c for c in args.configs.split(",") if c]:
        cfg = make_config(name.strip(), model, dtype_label=args.dtype)
        print(f"[kvpass-eval] {cfg.name}: {cfg.description}", file=sys.stderr, flush=True)
        rows.append(run_config(cfg, model, tok, ids, args))
        print(f"[kvpass-eval]   {rows[-1]}", file=sys.stderr, flush=True)
    md = to_markdown(rows, args, all_ids.shape[1])
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.md").write_text(md)
        with open(args.out / "quality.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["config"])
            w.writeheader()
            w.writerows(rows)
    return 0
