"""`megamor tokenizer ...` and `megamor data ...` subcommands.

    megamor tokenizer train INPUT... --out DIR --vocab-size N [--special-tokens A,B]
    megamor tokenizer import SRC --out DIR [--eos-token T] [--pad-token T]
    megamor tokenizer info PATH [--encode TEXT]
    megamor data prepare INPUT... --out DIR --seq-length N (--tokenizer PATH | --vocab-size N)
    megamor data inspect DIR_OR_SPEC [--split S] [--verify] [--show N]

Heavy imports happen inside the commands, so registering them costs nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def _fail(kind: str, e: Exception) -> int:
    sys.exit(f"megamor: {kind} error: {e}")


def _add_reading_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("reading the inputs")
    g.add_argument("--text-field", default="text",
                   help="JSON key / parquet or dataset column holding the text (default: text)")
    g.add_argument("--txt-mode", choices=["file", "line", "paragraph"], default="file",
                   help=".txt documents: one per file (default), per line, or per blank-line paragraph")
    g.add_argument("--hf-split", default="train",
                   help="split to read from a saved DatasetDict (default: train)")


# ----------------------------------------------------------------------------- tokenizer


def cmd_tokenizer_train(args: Any) -> int:
    from megamor.data.manifest import DataError
    from megamor.data.sources import Counts, iter_documents
    from megamor.tokenizer import TokenizerError, train_bpe

    specials = [t for t in args.special_tokens.split(",") if t]
    counts = Counts()
    try:
        docs = iter_documents(args.inputs, text_field=args.text_field, txt_mode=args.txt_mode,
                              hf_split=args.hf_split, counts=counts)
        show = sys.stderr.isatty() if args.progress is None else args.progress
        tok = train_bpe(docs, args.vocab_size, args.out, special_tokens=specials,
                        min_frequency=args.min_frequency, show_progress=show)
    except (DataError, TokenizerError, ValueError) as e:
        return _fail("tokenizer", e)
    print(f"trained {tok} on {counts.documents:,} documents ({counts.input_bytes:,} bytes) -> {args.out}")
    if tok.vocab_size < args.vocab_size:
        print(f"note: only {tok.vocab_size} entries (the corpus supports no more merges "
              f"at min_frequency={args.min_frequency})")
    _report_counts(counts)
    return 0


def _report_counts(counts: Any) -> None:
    bad = (counts.empty_documents, counts.non_utf8_documents, counts.bad_json_lines, counts.empty_files)
    if any(bad):
        print(f"skipped/repaired: {counts.empty_documents} empty documents, {counts.non_utf8_documents} "
              f"with non-UTF-8 bytes (replaced), {counts.bad_json_lines} bad JSON lines, "
              f"{counts.empty_files} empty files")
        for e in counts.examples:
            print(f"  {e}")


def cmd_tokenizer_import(args: Any) -> int:
    from megamor.tokenizer import TokenizerError, load_tokenizer
    try:
        tok = load_tokenizer(args.source, eos_token=args.eos_token, pad_token=args.pad_token)
        tok.save(args.out)
    except TokenizerError as e:
        return _fail("tokenizer", e)
    print(f"imported {tok} (eos {tok.eos_token!r}, pad {tok.pad_token!r}) -> {args.out}")
    return 0


def cmd_tokenizer_info(args: Any) -> int:
    from megamor.tokenizer import TokenizerError, load_tokenizer
    try:
        tok = load_tokenizer(args.path, eos_token=args.eos_token, pad_token=args.pad_token)
    except TokenizerError as e:
        return _fail("tokenizer", e)
    print(f"vocab_size  {tok.vocab_size}")
    print(f"eos         {tok.eos_token!r} = {tok.eos_id}")
    print(f"pad         {tok.pad_token!r} = {tok.pad_id}")
    print(f"fingerprint {tok.fingerprint}")
    if args.encode is not None:
        ids = tok.encode(args.encode)
        print(f"encode      {ids}")
        print(f"round trip  {tok.decode(ids) == args.encode}")
    return 0


# ----------------------------------------------------------------------------- data


def cmd_data_prepare(args: Any) -> int:
    from megamor.data.prepare import TOKENIZER_DIR, prepare_dataset
    from megamor.data.manifest import DataError
    from megamor.data.sources import iter_documents
    from megamor.tokenizer import TokenizerError, load_tokenizer, train_bpe

    if (args.tokenizer is None) == (args.vocab_size is None):
        sys.exit("megamor: data prepare: give exactly one of --tokenizer PATH (use an existing "
                 "tokenizer) or --vocab-size N (train a BPE on the inputs first)")
    workers = args.workers if args.workers is not None else (os.cpu_count() or 1)
    try:
        if args.tokenizer is not None:
            tok = load_tokenizer(args.tokenizer, eos_token=args.eos_token, pad_token=args.pad_token)
        else:
            # Trained on the training documents only (the val split is decided by a hash).
            docs = iter_documents(args.inputs, text_field=args.text_field, txt_mode=args.txt_mode,
                                  hf_split=args.hf_split, val_fraction=args.val_fraction, seed=args.seed)
            tok = train_bpe(docs, args.vocab_size, os.path.join(args.out, TOKENIZER_DIR))
            print(f"trained {tok}")
        res = prepare_dataset(
            args.inputs, tok, args.seq_length, args.out, samples_per_shard=args.samples_per_shard,
            val_fraction=args.val_fraction, text_field=args.text_field, txt_mode=args.txt_mode,
            hf_split=args.hf_split, keep_boundaries=args.keep_boundaries, seed=args.seed,
            workers=workers, force=args.force, progress=args.progress)
    except (DataError, TokenizerError) as e:
        return _fail("data", e)
    print(res.summary())
    return 0


def cmd_data_inspect(args: Any) -> int:
    from megamor.data.loader import BlendedDataset, open_training_data, parse_data_spec
    from megamor.data.manifest import DataError, load_manifest
    from megamor.data.shard_reader import ShardedTokenDataset
    from megamor.tokenizer import TokenizerError, load_tokenizer

    try:
        comps = parse_data_spec(args.target)
        failures, verified = 0, 0
        for c in comps:
            m = load_manifest(c.path)
            weight = f" (weight {c.weight})" if c.weight is not None else ""
            print(f"{m.path}{weight}")
            print(f"  tokenizer {m.tokenizer_fingerprint}  vocab {m.vocab_size}  eos {m.eos_id}  "
                  f"seq_length {m.seq_length}")
            for name, s in sorted(m.splits.items()):
                print(f"  {name}: {s.num_samples:,} samples, {len(s.shards)} shards of <= "
                      f"{s.samples_per_shard}, {s.num_tokens:,} tokens"
                      f"{', document boundaries' if s.doc_starts else ''}")
            counts = (m.prepare or {}).get("counts")
            if counts:
                print("  prepared from " + ", ".join(i["path"] for i in m.prepare.get("inputs", [])))
                print("  counts " + ", ".join(f"{k}={v}" for k, v in counts.items() if k != "examples"))
            if args.verify:
                for name in ([args.split] if args.split else sorted(m.splits)):
                    ds = ShardedTokenDataset(c.path, name)
                    for j, sh in enumerate(ds.info.shards):
                        verified += 1
                        try:
                            ds.verify_shard(j)
                            status = "ok"
                        except DataError as e:
                            failures += 1
                            status = f"FAILED: {e}"
                        print(f"    verify {sh.file}: {status}")
        if len(comps) > 1:
            ds = open_training_data(args.target, load_manifest(comps[0].path).seq_length,
                                    split=args.split or "train", seed=args.seed)
            assert isinstance(ds, BlendedDataset)
            print(f"blend of {len(ds):,} samples (seed {args.seed}):")
            for name, w, n in zip(ds.names, ds.weights, ds.counts):
                print(f"  {w:.3f}  {int(n):>10,} samples  {name}")
        if args.show:
            tok_dir = comps[0].path / "tokenizer"
            tok = load_tokenizer(tok_dir) if tok_dir.exists() else None
            ds0 = ShardedTokenDataset(comps[0].path, args.split or "train")
            for i in range(min(args.show, len(ds0))):
                ids = ds0[i].tolist()
                text = tok.decode(ids) if tok is not None else str(ids)
                print(f"--- sample {i} ---\n{text}")
    except (DataError, TokenizerError) as e:
        return _fail("data", e)
    if failures:
        sys.exit(f"megamor: data error: {failures} of {verified} shard(s) failed verification")
    if args.verify:
        print(f"verified {verified} shard(s) of {len(comps)} dataset(s): all intact (size, "
              f"sha256, tar)")
    return 0


# ----------------------------------------------------------------------------- registration


def add_parsers(sub: Any) -> None:
    """Register `tokenizer` and `data` on the CLI's subparsers object."""
    t = sub.add_parser("tokenizer", help="train, import or inspect a tokenizer")
    tsub = t.add_subparsers(dest="action", required=True)

    p = tsub.add_parser("train", help="train a byte-level BPE on text inputs")
    p.add_argument("inputs", nargs="+", help="files, directories, globs, saved datasets, or 'builtin'")
    p.add_argument("--out", required=True, help="output directory (tokenizer.json + megamor meta)")
    p.add_argument("--vocab-size", type=int, required=True, help="vocabulary size incl. special tokens")
    p.add_argument("--special-tokens", default="<|endoftext|>,<|pad|>",
                   help="comma-separated; the first is EOS, the second PAD "
                        "(default: <|endoftext|>,<|pad|>)")
    p.add_argument("--min-frequency", type=int, default=2, help="minimum pair count for a merge (2)")
    _add_reading_options(p)
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    p.set_defaults(fn=cmd_tokenizer_train)

    p = tsub.add_parser("import", help="copy a Hugging Face tokenizer (tokenizer.json or directory) "
                                       "into a megamor tokenizer directory, offline")
    p.add_argument("source", help="tokenizer.json, or a HF tokenizer directory")
    p.add_argument("--out", required=True)
    p.add_argument("--eos-token", help="override the EOS token")
    p.add_argument("--pad-token", help="override the PAD token")
    p.set_defaults(fn=cmd_tokenizer_import)

    p = tsub.add_parser("info", help="print vocabulary size, EOS/PAD and fingerprint")
    p.add_argument("path")
    p.add_argument("--eos-token")
    p.add_argument("--pad-token")
    p.add_argument("--encode", metavar="TEXT", help="also encode TEXT and check the round trip")
    p.set_defaults(fn=cmd_tokenizer_info)

    d = sub.add_parser("data", help="prepare or inspect training data")
    dsub = d.add_subparsers(dest="action", required=True)

    p = dsub.add_parser("prepare", help="tokenize and pack text into webdataset shards + manifest")
    p.add_argument("inputs", nargs="+", help="files (.txt/.jsonl[.gz|.zst], .parquet), directories, "
                                             "globs, saved datasets, or 'builtin'")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seq-length", type=int, required=True, help="model sequence length")
    p.add_argument("--tokenizer", help="tokenizer directory or tokenizer.json (megamor or HF)")
    p.add_argument("--vocab-size", type=int, help="instead of --tokenizer: train a BPE of this size "
                                                  "on the inputs into OUT/tokenizer")
    p.add_argument("--eos-token", help="override the tokenizer's EOS token")
    p.add_argument("--pad-token", help="override the tokenizer's PAD token")
    p.add_argument("--samples-per-shard", type=int, default=256, help="samples per tar shard (256)")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents held out as the 'val' split (default 0.01; 0: none)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split (0)")
    p.add_argument("--keep-boundaries", action="store_true",
                   help="store per-sample document start positions (docstarts.npy)")
    p.add_argument("--workers", type=int, default=None,
                   help="tokenizer processes (default: CPU count; 0: in this process)")
    p.add_argument("--force", action="store_true", help="rebuild even when up to date")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar (default: when stderr is a terminal)")
    _add_reading_options(p)
    p.set_defaults(fn=cmd_data_prepare)

    p = dsub.add_parser("inspect", help="summarise prepared data (or a blend spec), verify shards")
    p.add_argument("target", help="prepared directory, or a spec like '0.7:/a,0.3:/b'")
    p.add_argument("--split", help="only this split (verify/show); default: all / train")
    p.add_argument("--verify", action="store_true", help="check every shard's size, sha256 and tar")
    p.add_argument("--show", type=int, default=0, metavar="N", help="decode the first N samples")
    p.add_argument("--seed", type=int, default=0, help="blend seed (with a multi-dataset spec)")
    p.set_defaults(fn=cmd_data_inspect)
