"""Command line: perplexity (+ passkey) of KV-cache configs on one or more texts, as a table.

    python -m kvpass eval --text novel.txt --configs bf16,kivi-b2-g32-r128,naive-b2
    python -m kvpass eval --text a.txt b.txt c.txt --start-char 30000 --tokens 1400
    python benchmarks/quality.py --out benchmarks/results

Several texts are scored as one batch (same number of tokens each, no padding): perplexity is
pooled over all scored tokens and also given per text. Writes quality.md and quality.csv into
--out (and prints the markdown).
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
import traceback
from pathlib import Path

import torch

from kvpass.evaluate.configs import EvalConfig, default_config_names, make_config
from kvpass.evaluate.model import load_model
from kvpass.evaluate.passkey import passkey
from kvpass.evaluate.perplexity import sequence_nll

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_TEXT = REPO_ROOT.parent / "shared" / "data" / "texts" / "emma.txt"


def _int_list(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in s.split(",") if x)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="kvpass-eval", description=__doc__.splitlines()[0])
    p.add_argument("--start-char", type=int, default=0,
                   help="skip this many characters of the text (the issue's protocol: Emma from 30000)")
    p.add_argument("--text", type=Path, nargs="+", default=None,
                   help=f"text file(s) to score, batched (default: {DEFAULT_TEXT} when present)")
    p.add_argument("--model", default="default",
                   help="local model dir, or 'default' for SmolLM2-135M-Instruct")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="model compute dtype (weights are bf16; fp32 math is the CPU default)")
    p.add_argument("--tokens", type=int, default=1024, help="scored tokens per text")
    p.add_argument("--prefix", type=int, default=512, help="prompt tokens prefilled at once")
    p.add_argument("--chunk", type=int, default=1, help="tokens per decode step")
    p.add_argument("--configs", default=",".join(default_config_names()),
                   help="comma-separated config names (see kvpass.evaluate.configs)")
    p.add_argument("--perplexity", action=argparse.BooleanOptionalAction, default=True,
                   help="score perplexity (--no-perplexity: passkey only)")
    p.add_argument("--passkey", action=argparse.BooleanOptionalAction, default=True,
                   help="also run passkey retrieval (slow on CPU: long prefills)")
    p.add_argument("--passkey-lengths", type=_int_list, default=(1000, 2000, 4000, 7000))
    p.add_argument("--passkey-trials", type=int, default=1, help="trials per length and depth")
    p.add_argument("--out", type=Path, default=None, help="directory for quality.md / .csv")
    return p.parse_args(argv)


def _text_paths(paths: list[Path] | None) -> list[Path]:
    if not paths:
        if not DEFAULT_TEXT.is_file():
            raise SystemExit(f"no --text given and the default {DEFAULT_TEXT} is missing; "
                             f"pass --text FILE (any long plain-text file, e.g. a novel)")
        return [DEFAULT_TEXT]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"--text: no such file(s): {', '.join(missing)}")
    return list(paths)


def _token_batch(paths: list[Path], tok, args) -> torch.Tensor:
    """ids [len(paths), prefix + tokens]: each text from --start-char, cut to the same length."""
    need = args.prefix + args.tokens
    rows = []
    for path in paths:
        text = path.read_text(encoding="utf-8")[args.start_char:]
        ids = tok(text[: need * 12], return_tensors="pt").input_ids  # ~4 chars/token: ample
        if ids.shape[1] < need:
            raise SystemExit(f"{path} has {ids.shape[1]} tokens after --start-char "
                             f"{args.start_char}, need prefix+tokens = {need}")
        rows.append(ids[:, :need])
    return torch.cat(rows)                                        # [n_texts, prefix + tokens]


def run_config(cfg: EvalConfig, model, tok, ids, args, labels) -> dict:
    """Measure one config; errors are recorded in the row rather than aborting the table."""
    row = {"config": cfg.name, "description": cfg.description, "ppl": "", "passkey": "",
           "seconds": "", "note": cfg.skip_reason, **{f"ppl_{lb}": "" for lb in labels}}
    if cfg.skip_reason:
        return row
    t0 = time.perf_counter()
    try:
        if args.perplexity:
            nll = sequence_nll(model, ids, backend=cfg.backend, prefix=args.prefix,
                               chunk=args.chunk, cache_factory=cfg.cache_factory)  # [n_texts]
            row["ppl"] = f"{math.exp(nll.sum().item() / (nll.numel() * args.tokens)):.3f}"
            for lb, x in zip(labels, nll.tolist()):
                row[f"ppl_{lb}"] = f"{math.exp(x / args.tokens):.3f}"
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


def _relative(ppl: str, fp: float | None) -> str:
    return f"{(float(ppl) / fp - 1) * 100:+.1f}%" if fp and ppl else ""


def to_markdown(rows, args, labels) -> str:
    model_label = ("SmolLM2-135M-Instruct (bf16 weights)" if args.model in (None, "", "default")
                   else args.model)
    fp_row = next((r for r in rows if r["config"] in ("bf16", "fp") and r["ppl"]), None)
    fp = float(fp_row["ppl"]) if fp_row else None
    texts = ", ".join(labels)
    what = (f"Perplexity over {args.tokens} tokens per text after a {args.prefix}-token prefill, "
            f"teacher-forced through the decode path ({args.chunk} token/step), pooled over "
            f"{len(labels)} text(s) ({texts}; from character {args.start_char}): "
            f"{len(labels) * args.tokens} scored tokens. " if args.perplexity else "")
    if args.passkey:
        what += (f"Passkey: hits out of {3 * args.passkey_trials} prompts per length (key at depths "
                 f"0.1/0.5/0.9 of the filler, {args.passkey_trials} trial(s) each, greedy answer). ")
    lines = [f"# KV-cache quality\n",
             f"Model {model_label}, math {args.dtype}. {what}"
             f"'bf16' is the uncompressed cache ({args.dtype} math here).\n",
             "| config | description | ppl | vs uncompressed | passkey | time (s) | note |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['config']} | {r['description']} | {r['ppl']} | "
                     f"{_relative(r['ppl'], fp)} | {r['passkey']} | {r['seconds']} | "
                     f"{r['note'].replace('|', '/')} |")
    if len(labels) > 1 and args.perplexity:
        lines += ["\nPer text (ppl, and change vs the uncompressed cache on the same text):\n",
                  "| config | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|"]
        for r in rows:
            cells = []
            for lb in labels:
                base = float(fp_row[f"ppl_{lb}"]) if fp_row else None
                cells.append(f"{r[f'ppl_{lb}']} ({_relative(r[f'ppl_{lb}'], base)})"
                             if r[f"ppl_{lb}"] and r is not fp_row else r[f"ppl_{lb}"])
            lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main_eval(argv=None) -> int:
    """Entry point; returns the process exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not (args.perplexity or args.passkey):
        raise SystemExit("nothing to do: --no-perplexity and --no-passkey")
    paths = _text_paths(args.text) if args.perplexity else []  # passkey makes its own text
    labels = [p.stem for p in paths]
    if len(set(labels)) != len(labels):
        raise SystemExit(f"--text: file names must differ (they label the columns): {labels}")
    dtype = getattr(torch, args.dtype)
    model, tok = load_model(args.model, dtype=dtype)
    ids = _token_batch(paths, tok, args) if args.perplexity else None  # [n_texts, prefix+tokens]
    rows = []
    t_start = time.perf_counter()
    for name in [c for c in args.configs.split(",") if c]:
        cfg = make_config(name.strip(), model, dtype_label=args.dtype)
        print(f"[kvpass-eval] {cfg.name}: {cfg.description}", file=sys.stderr, flush=True)
        rows.append(run_config(cfg, model, tok, ids, args, labels))
        print(f"[kvpass-eval]   {rows[-1]}", file=sys.stderr, flush=True)
    md = to_markdown(rows, args, labels)
    md += f"\nTotal time {time.perf_counter() - t_start:.0f} s.\n"
    print(md)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "quality.md").write_text(md)
        with open(args.out / "quality.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["config"])
            w.writeheader()
            w.writerows(rows)
    return 0
