"""Data pipeline benchmark: preprocessing throughput and GPT sample-index build cost.

    python tools/bench_data.py                      # both parts, defaults below
    python tools/bench_data.py --jsonl-mb 50 --workers 1 2 --index-tokens 1e9 --index-documents 1e6

1. Preprocessing: generates a JSONL of --jsonl-mb MB of synthetic text (Zipf-distributed made-up
   words, so no third-party text) under --work-dir, trains a byte-level BPE of --vocab-size on its
   first 4 MB (or uses --vocab-file/--merge-file), then runs the real preprocess_jsonl at each
   --workers count and prints tokens/s. Baseline, same process: a plain loop (json.loads, one
   tokenize() call and one add_document() per document) on the first 8 MB.
2. Sample index: writes a real .idx for --index-documents documents holding --index-tokens tokens
   in total, with a sparse .bin of the right size (the token values are never read by the index
   builder), then times build_gpt_datasets for one epoch of --seq-length samples in a fresh
   subprocess: cold (build the arrays, write the cache) and warm (load from the cache), and
   reports that process's peak resident memory and peak numpy allocations during the cold build.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

from megatronish.data.indexed_dataset import IndexedDatasetBuilder, bin_path, idx_path, optimal_dtype, write_index
from megatronish.data.preprocess import TokenizerSpec, preprocess_jsonl


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default="/tmp/megatronish-bench-data")
    p.add_argument("--jsonl-mb", type=float, default=50.0)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--vocab-file")
    p.add_argument("--merge-file")
    p.add_argument("--index-tokens", type=float, default=1e9)
    p.add_argument("--index-documents", type=float, default=1e6)
    p.add_argument("--seq-length", type=int, default=2048)
    p.add_argument("--skip-preprocess", action="store_true")
    p.add_argument("--skip-index", action="store_true")
    return p.parse_args(argv)


def generate_jsonl(path: str, megabytes: float, seed: int = 0) -> None:
    """Documents of Zipf-distributed made-up words, written in blocks until the size is reached."""
    if os.path.exists(path) and os.path.getsize(path) >= megabytes * 1e6:
        return
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    word_lengths = rng.integers(2, 11, size=30000)
    spellings = np.split(rng.choice(letters, size=word_lengths.sum()), np.cumsum(word_lengths)[:-1])
    words = np.array(["".join(w) for w in spellings])
    punctuation = np.array([" ", " ", " ", " ", " ", " ", ", ", ". ", ".\n"])
    written = 0
    with open(path + ".partial", "w") as f:
        while written < megabytes * 1e6:
            ranks = np.minimum(rng.zipf(1.2, size=200_000), len(words)) - 1
            tokens = np.char.add(words[ranks], punctuation[rng.integers(0, len(punctuation), size=len(ranks))])
            cuts = np.cumsum(rng.integers(50, 1500, size=len(ranks) // 50))
            for doc in np.split(tokens, cuts[cuts < len(tokens)]):
                line = json.dumps({"text": "".join(doc)}) + "\n"
                f.write(line)
                written += len(line)
    os.replace(path + ".partial", path)


def tokenizer_for(args, jsonl: str) -> TokenizerSpec:
    if args.vocab_file:
        return TokenizerSpec("GPT2BPETokenizer", args.vocab_file, args.merge_file)
    from megatronish.data.tokenizer_training import train_byte_level_bpe

    folder = os.path.join(args.work_dir, f"bpe{args.vocab_size}")
    if not os.path.exists(os.path.join(folder, "merges.txt")):
        sample = os.path.join(args.work_dir, "tokenizer_sample.txt")
        with open(jsonl, "rb") as f, open(sample, "w") as out:
            for line in f.readlines(4 << 20):
                out.write(json.loads(line)["text"] + "\n")
        train_byte_level_bpe([sample], folder, args.vocab_size)
    return TokenizerSpec("GPT2BPETokenizer", os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))


def plain_loop(jsonl: str, spec: TokenizerSpec, output_prefix: str, limit_bytes: int = 8 << 20):
    """-> (tokens/s, tokens) of the simplest preprocessing loop over the first `limit_bytes`."""
    tokenizer = spec.build()
    builder = IndexedDatasetBuilder(output_prefix, optimal_dtype(tokenizer.vocab_size))
    tokens, start = 0, time.perf_counter()
    with open(jsonl, "rb") as f:
        for line in f.readlines(limit_bytes):
            ids = tokenizer.tokenize(json.loads(line)["text"]) + [tokenizer.eod]
            builder.add_document(ids)
            tokens += len(ids)
    builder.finalize()
    return tokens / (time.perf_counter() - start), tokens


def bench_preprocess(args) -> None:
    os.makedirs(args.work_dir, exist_ok=True)
    jsonl = os.path.join(args.work_dir, f"synthetic_{args.jsonl_mb:g}mb.jsonl")
    start = time.perf_counter()
    generate_jsonl(jsonl, args.jsonl_mb)
    print(f"input: {jsonl}, {os.path.getsize(jsonl) / 1e6:.1f} MB (ready in {time.perf_counter() - start:.1f} s)")
    spec = tokenizer_for(args, jsonl)
    print(f"tokenizer: GPT2BPETokenizer, vocab {spec.build().vocab_size}, cores on this machine: {os.cpu_count()}")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core for the baseline too
    cpu_before = cpu_seconds()
    baseline, tokens = plain_loop(jsonl, spec, os.path.join(args.work_dir, "plain"))
    print(
        f"plain per-document loop (first 8 MB): {baseline / 1e6:.2f} M tokens/s, "
        f"{tokens / (cpu_seconds() - cpu_before) / 1e6:.2f} M tokens per CPU-second"
    )
    for workers in args.workers:
        cpu_before = cpu_seconds()
        stats = preprocess_jsonl(
            jsonl,
            os.path.join(args.work_dir, f"out_w{workers}"),
            spec,
            append_eod=True,
            workers=workers,
            log_interval=10**12,
        )
        cpu = cpu_seconds() - cpu_before
        rate = stats.tokens / stats.seconds
        print(
            f"preprocess_jsonl --workers {workers}: {stats.tokens / 1e6:.1f} M tokens, {stats.documents:,} docs in "
            f"{stats.seconds:.1f} s = {rate / 1e6:.2f} M tokens/s, {stats.documents / stats.seconds:,.0f} docs/s, "
            f"{os.path.getsize(jsonl) / 1e6 / stats.seconds:.1f} MB/s ({rate / baseline:.1f}x the plain loop); "
            f"{cpu:.0f} CPU-s in all processes = {stats.tokens / cpu / 1e6:.2f} M tokens per CPU-second"
        )
    print(f"load average now: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work shares these cores)")


def cpu_seconds() -> float:
    """User + system time of this process and of its finished children (the pool workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_synthetic_dataset(prefix: str, num_tokens: int, num_documents: int, seed: int = 0) -> None:
    """A real .idx with random document lengths summing to num_tokens; a sparse .bin of zeros."""
    rng = np.random.default_rng(seed)
    share = rng.lognormal(0.0, 1.0, size=num_documents)  # long-tailed, like real document lengths
    lengths = 1 + rng.multinomial(num_tokens - num_documents, share / share.sum())
    write_index(idx_path(prefix), np.uint16, lengths, np.arange(num_documents + 1))
    with open(bin_path(prefix), "wb") as f:
        f.truncate(num_tokens * 2)


INDEX_CHILD = r"""
import json, os, shutil, sys, time, tracemalloc
from megatronish.data.gpt_dataset import GPTDatasetConfig, build_gpt_datasets

def rss_mb(field):
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) for l in f if l.startswith(field)) / 1024

prefix, cache, seq, samples = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
shutil.rmtree(cache, ignore_errors=True)
before = rss_mb("VmRSS:")
tracemalloc.start()
start = time.perf_counter()
train = build_gpt_datasets([prefix], GPTDatasetConfig(1234, seq, "1", path_to_cache=cache), (samples, 0, 0))[0]
cold = time.perf_counter() - start
numpy_peak = tracemalloc.get_traced_memory()[1] / 2**20
tracemalloc.stop()
peak = rss_mb("VmHWM:")
start = time.perf_counter()
warm_ds = build_gpt_datasets([prefix], GPTDatasetConfig(1234, seq, "1", path_to_cache=cache), (samples, 0, 0))[0]
warm = time.perf_counter() - start
for i in range(1000):  # warm-up: the first touch of each page of the maps
    warm_ds[i]
start = time.perf_counter()
for i in range(1000, 3000):
    warm_ds[i]
per_sample = (time.perf_counter() - start) / 2000
print(json.dumps(dict(cold=cold, warm=warm, rss_before=before, rss_peak=peak, numpy_peak=numpy_peak,
                      per_sample_us=per_sample * 1e6, samples=len(train))))
"""


def bench_index(args) -> None:
    num_tokens, num_documents = int(args.index_tokens), int(args.index_documents)
    prefix = os.path.join(args.work_dir, f"synthetic_{num_tokens:.0e}_{num_documents:.0e}")
    os.makedirs(args.work_dir, exist_ok=True)
    start = time.perf_counter()
    write_synthetic_dataset(prefix, num_tokens, num_documents)
    samples = (num_tokens - 1) // args.seq_length  # one epoch
    print(
        f"synthetic dataset: {num_tokens:.0e} tokens in {num_documents:.0e} documents, .idx "
        f"{os.path.getsize(idx_path(prefix)) / 1e6:.0f} MB, sparse .bin "
        f"(written in {time.perf_counter() - start:.1f} s)"
    )
    done = subprocess.run(
        [sys.executable, "-c", INDEX_CHILD, prefix, prefix + "_cache", str(args.seq_length), str(samples)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"the index benchmark process failed:\n{done.stderr}")
    r = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"sample index, seq_length {args.seq_length}, {r['samples']:,} samples (one epoch):")
    print(f"  cold build (document/sample/shuffle index + cache write): {r['cold']:.2f} s")
    print(
        f"  warm load from the cache: {r['warm']:.3f} s; reading a sample (after warm-up): {r['per_sample_us']:.0f} us"
    )
    print(
        f"  memory: peak RSS {r['rss_peak']:.0f} MB for the process ({r['rss_before']:.0f} MB before the build: "
        f"interpreter, torch, numpy); peak numpy/Python allocations during the build {r['numpy_peak']:.0f} MB"
    )


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.skip_preprocess:
        bench_preprocess(args)
    if not args.skip_index:
        bench_index(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
