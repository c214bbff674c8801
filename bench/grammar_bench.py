"""Grammar engines for structured output, measured on the SmolLM2 tokenizer (49,152 tokens): xgrammar,
llguidance and outlines-core (whichever are installed).

For a JSON schema (nested object, array, enum, required, string bounds, a pattern), a regex (a log line) and
the same regex with `+` for its `{1,80}`, it measures, per engine:
  - setup: wrapping the tokenizer (once per engine process);
  - compile: building the grammar for the tokenizer, cold (no cache), median of --repeats;
  - mask: filling one row of the token bitmask per decode step, along the tokens of a valid output (what the
    sampler waits for when a structured row is in the batch), mean / median / p99 / max over the steps;
  - accept: advancing the matcher by the sampled token, mean per step.
and once: applying a [1, vocab] bitmask to the logits with plain torch (engine/structured.py's way), on the CPU.

    .venv/bin/python -m pip install llguidance outlines-core     # the two not picked, for the comparison
    .venv/bin/python bench/grammar_bench.py                       # prints JSON
    .venv/bin/python bench/grammar_bench.py --out bench/results/grammar-YYYYMMDD.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path += [os.path.join(REPO, "worker_image")]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z]+\\.[a-z]{2,3}$"},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                           "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city"],
        },
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "scores": {"type": "array", "items": {"type": "number"}},
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "email", "role", "address", "tags", "scores", "active"],
    "additionalProperties": False,
}
JSON_TEXT = json.dumps({
    "name": "Ada Lovelace", "age": 36, "email": "ada.lovelace@analytical.org", "role": "admin",
    "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
    "tags": ["mathematics", "poetry", "engines"], "scores": [9.5, 7.25, 10], "active": True,
})
REGEX = r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z (INFO|WARN|ERROR) [a-z_]+: [A-Za-z0-9 ,.]{1,80}"
REGEX_TEXT = "2026-12-03T07:15:00Z WARN scheduler: queue depth 12 is over the limit of 8, shedding load."
REGEX_PLUS = REGEX.replace("{1,80}", "+")  # the same without the bounded repetition (costly to compile for some)
CASES = (("json", SCHEMA, JSON_TEXT), ("regex", REGEX, REGEX_TEXT), ("regex_plus", REGEX_PLUS, REGEX_TEXT))


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def stats(seconds: list[float]) -> dict:
    us = sorted(s * 1e6 for s in seconds)
    return {"mean_us": round(statistics.fmean(us), 1), "median_us": round(statistics.median(us), 1),
            "p99_us": round(us[min(len(us) - 1, int(len(us) * 0.99))], 1), "max_us": round(us[-1], 1),
            "steps": len(us)}


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer, vocab_size):
        import xgrammar as xgr
        self.xgr, self.vocab_size = xgr, vocab_size
        self.info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
        self.bitmask = xgr.allocate_token_bitmask(1, vocab_size)

    def compile(self, kind, value):
        compiler = self.xgr.GrammarCompiler(self.info, cache_enabled=False)
        if kind == "json":  # as engine/structured.py compiles it
            return compiler.compile_json_schema(value, any_whitespace=False)
        return compiler.compile_regex(value)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matcher):
        matcher.fill_next_token_bitmask(self.bitmask, 0)

    def accept(self, matcher, token):
        assert matcher.accept_token(token), token


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer, vocab_size):
        import llguidance
        import llguidance.hf
        import llguidance.torch
        self.llg = llguidance
        self.tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size)
        self.bitmask = llguidance.torch.allocate_token_bitmask(1, vocab_size)

    def compile(self, kind, value):
        grammar = (self.llg.LLMatcher.grammar_from_json_schema(value) if kind == "json"
                   else self.llg.LLMatcher.grammar_from_regex(value))
        matcher = self.llg.LLMatcher(self.tokenizer, grammar)  # validates and builds the parser
        assert not matcher.is_error(), matcher.get_error()
        return grammar

    def matcher(self, grammar):
        return self.llg.LLMatcher(self.tokenizer, grammar)

    def fill(self, matcher):
        self.llg.torch.fill_next_token_bitmask(matcher, self.bitmask, 0)

    def accept(self, matcher, token):
        assert matcher.consume_token(token), matcher.get_error()


class OutlinesCore:
    name = "outlines-core"

    def __init__(self, tokenizer, vocab_size):
        import outlines_core
        self.oc = outlines_core
        # Vocabulary wants each token's bytes -> ids, less EOS (from_pretrained would fetch the tokenizer from
        # the hub): byte-level BPE spells bytes as printable characters (GPT-2's bytes_to_unicode).
        printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
        others = [b for b in range(256) if b not in printable]
        byte_of = {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}
        eos, special = tokenizer.eos_token_id, set(tokenizer.all_special_ids)
        vocab = {}
        for token, token_id in tokenizer.get_vocab().items():
            if token_id != eos and token_id not in special:
                vocab.setdefault(bytes(byte_of[c] for c in token), []).append(token_id)
        self.vocabulary = outlines_core.Vocabulary(eos, vocab)
        self.bitmask = torch.zeros(1, (vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, kind, value):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(value)) if kind == "json" else value
        return self.oc.Index(regex, self.vocabulary)

    def matcher(self, index):
        return self.oc.Guide(index)

    def fill(self, guide):
        guide.write_mask_into(self.bitmask.data_ptr(), self.bitmask.numel(), self.bitmask.element_size())

    def accept(self, guide, token):
        guide.advance(token, return_tokens=False)


def measure(engine_cls, tokenizer, vocab_size, repeats: int) -> dict:
    engine, setup_s = timed(engine_cls, tokenizer, vocab_size)
    result = {"setup_ms": round(setup_s * 1e3, 1)}
    for kind, value, text in CASES:
        compiles = []
        for _ in range(repeats):
            compiled, seconds = timed(engine.compile, kind, value)
            compiles.append(seconds)
        tokens = tokenizer.encode(text, add_special_tokens=False)
        fills, accepts = [], []
        for _ in range(repeats):
            matcher = engine.matcher(compiled)
            for token in tokens:
                fills.append(timed(engine.fill, matcher)[1])
                accepts.append(timed(engine.accept, matcher, token)[1])
            fills.append(timed(engine.fill, matcher)[1])  # the last mask: EOS allowed
        result[kind] = {"compile_ms": round(statistics.median(compiles) * 1e3, 1),
                        "compile_ms_all": [round(s * 1e3, 1) for s in compiles],
                        "output_tokens": len(tokens), "mask": stats(fills),
                        "accept_mean_us": round(statistics.fmean(accepts) * 1e6, 1)}
    return result


def apply_mask_cost(vocab_size: int, repeats: int = 200) -> dict:
    """The sampler's part: unpack a [1, words] int32 bitmask and mask a [1, vocab] float32 row (CPU)."""
    from rayprism.engine.structured import apply_token_bitmask
    logits = torch.randn(8, vocab_size)
    bitmask = torch.randint(-2**31, 2**31 - 1, (1, (vocab_size + 31) // 32), dtype=torch.int32)
    rows = torch.tensor([3])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one small row: more threads only wait on each other (and on a busy machine)
    try:
        apply_token_bitmask(logits, bitmask, rows, vocab_size)
        seconds = [timed(apply_token_bitmask, logits, bitmask, rows, vocab_size)[1] for _ in range(repeats)]
    finally:
        torch.set_num_threads(threads)
    return stats(seconds)


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.platform()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the JSON here too")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    from rayprism.engine.loader import resolve_model_path
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("builtin://smollm2-135m-instruct"))
    vocab_size = len(tokenizer)
    engines = {}
    for cls, module in ((XGrammar, "xgrammar"), (LLGuidance, "llguidance"), (OutlinesCore, "outlines_core")):
        try:
            __import__(module)
        except ImportError:
            continue
        from importlib.metadata import version
        engines[cls.name] = {"version": version(cls.name), **measure(cls, tokenizer, vocab_size, args.repeats)}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    report = {
        "what": "Grammar engines on the SmolLM2 tokenizer: compile (cold) and per-decode-step mask fill for a "
                "JSON schema and a regex, along a valid output's tokens (bench/grammar_bench.py docstring)",
        "machine": f"{cpu_model()}, {os.cpu_count()} cores ({platform.machine()})",
        "load_average_at_start": os.getloadavg()[0],
        "python": platform.python_version(), "torch": torch.__version__,
        "command": " ".join(["python"] + sys.argv), "commit": commit,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"),
        "vocab_size": vocab_size, "schema": SCHEMA, "regex": REGEX, "regex_plus": REGEX_PLUS,
        "engines": engines,
    }
    try:
        report["apply_mask_cpu"] = apply_mask_cost(vocab_size)
    except ImportError:
        pass
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
