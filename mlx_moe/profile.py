"""Expert-usage profiling: which experts each MoE layer picks, and how much weight they get.

``mlx_moe.profile --model M --prompts FILE`` runs prompts (one a line, or a JSONL of chats)
and ``mlx_moe.generate --profile FILE`` profiles one generation. Both write one JSON object
(schema below, ``SCHEMA_VERSION``) and print a summary table; ``--plot FILE.png`` draws a
layers x experts heatmap (needs matplotlib: ``pip install 'mlx-moe-engine[plot]'``).

How it records, without touching the hot path: :meth:`ExpertProfiler.attach` swaps the class
of each MoE block for a subclass whose ``route`` hands ``(weights, ids)`` to the profiler
(as ``distributed/tensor.py`` adds its ``all_sum``); :meth:`detach` puts the class back. An
unprofiled model runs the plain ``MoEBlock`` code — no flag test, no branch.

The recorded arrays stay lazy: they are part of the step's graph (the experts use them), so
the step's own evaluation computes them. They are read on the host two forwards later
(mlx-lm evaluates step n+1 asynchronously while step n is consumed, so forwards up to n-1
are done) or at :meth:`finish` — no host sync per layer, none per step beyond what the
generation loop already does.

Prefill vs decode is decided by token position: the first ``prompt_tokens`` tokens a layer
sees after :meth:`begin` are prefill, every later one decode (a forward that straddles the
boundary is split), so mlx-lm's pipelined loop, which routes the last prompt token in its
first decode step, is still counted exactly.

JSON (``version`` 1)::

    version, model, num_experts, top_k, moe_layers ([decoder layer index per row]), prompts,
    phases: {prefill|decode|all: {tokens, counts [L][E], weight_mass [L][E],
             entropy_bits [L], entropy_norm [L], max_over_mean [L]}},
    coactivation: null or {"all": [L][E][E] pair counts (symmetric, zero diagonal)},
    timing: null or {steps, every, per_token_ms: {router, experts, attention, rest, total},
             share: {router, experts, attention, rest}, untimed_step_ms}
    (mlx_moe.profile also adds seconds, generated_tokens; mlx_moe.generate generated_tokens)

``counts[l][e]``: tokens of layer ``moe_layers[l]`` routed to expert ``e``; each phase's
counts sum to ``tokens * top_k`` per layer. ``weight_mass``: the sum of the routing weights
given to ``e``. Load balance from the counts: ``entropy_bits`` (log2 E when balanced),
``entropy_norm`` = entropy / log2 E, ``max_over_mean`` (1 when balanced, E / top_k at worst).
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from .cli import (UsageError, add_backend_arg, add_quantize_args, add_verbose, checked, dash_values, message, positive_int,
                  quantize_spec, run)

PROG = "mlx_moe.profile"
SCHEMA_VERSION = 1
PHASES = ("prefill", "decode")
PLOT_HINT = "--plot needs matplotlib: pip install 'mlx-moe-engine[plot]' (or pip install matplotlib)"


def _profiled_class(cls):
    """``cls`` with a recording ``route``, and a ``__call__`` that times router and experts on
    the profiler's timed steps (cached per class)."""
    sub = _CLASSES.get(cls)
    if sub is None:
        def route(self, x):
            weights, ids = cls.route(self, x)
            self._mlx_moe_profiler.record(self._mlx_moe_profile_row, weights, ids)
            return weights, ids

        def __call__(self, x):
            prof = self._mlx_moe_profiler
            if prof.timer is None:
                return cls.__call__(self, x)
            from .experts import MoEExperts

            t = prof.timer
            t.boundary("rest", x)
            weights, ids = self.route(x)
            t.boundary("router", weights, ids)
            routed = self.routed  # as MoEBlock.__call__
            y = routed(x, weights, ids, validate=False) if isinstance(routed, MoEExperts) else routed(x, weights, ids)
            s = self.shared(x)
            y = y if s is None else y + s
            t.boundary("experts", y)
            return y

        sub = type(f"Profiled{cls.__name__}", (cls,),
                   {"route": route, "__call__": __call__, "_mlx_moe_profiled_base": cls})
        _CLASSES[cls] = sub
    return sub


def _timed_attention_class(cls):
    sub = _CLASSES.get(("attn", cls))
    if sub is None:
        def __call__(self, x, *args, **kwargs):
            t = self._mlx_moe_profiler.timer
            if t is None:
                return cls.__call__(self, x, *args, **kwargs)
            t.boundary("rest", x)
            y = cls.__call__(self, x, *args, **kwargs)
            t.boundary("attention", y)
            return y

        sub = type(f"Timed{cls.__name__}", (cls,), {"__call__": __call__, "_mlx_moe_profiled_base": cls})
        _CLASSES[("attn", cls)] = sub
    return sub


class StepTimer:
    """Wall time of one step split at evaluation boundaries: each boundary evaluates the
    arrays there and books the time since the previous boundary to ``part``."""

    PARTS = ("router", "experts", "attention", "rest")

    def __init__(self):
        self.totals = {p: 0.0 for p in self.PARTS}
        self.steps = 0
        self._last = None

    def start(self):
        self._last = time.perf_counter()

    def boundary(self, part, *arrays):
        import mlx.core as mx

        mx.eval(*arrays)
        now = time.perf_counter()
        self.totals[part] += now - self._last
        self._last = now

    def stop(self, *arrays):
        self.boundary("rest", *arrays)
        self.steps += 1

    def result(self):
        if not self.steps:
            return None
        ms = {p: 1e3 * v / self.steps for p, v in self.totals.items()}
        ms["total"] = sum(ms.values())
        return {"steps": self.steps, "per_token_ms": ms,
                "share": {p: (ms[p] / ms["total"] if ms["total"] else None) for p in self.PARTS}}


_CLASSES = {}


def moe_blocks(model):
    """``[(decoder layer index, MoE block)]`` of ``model``."""
    from .models import MoEBlock

    out = []
    for i, layer in enumerate(model.layers):
        for child in layer.children().values():
            if isinstance(child, MoEBlock):
                out.append((i, child))
                break
    return out


class ExpertProfiler:
    """Counts routed (token, expert) pairs per MoE layer, prefill and decode apart."""

    def __init__(self, model, coactivation=False):
        self.blocks = moe_blocks(model)
        self._model_layers = list(model.layers)
        self._attention = []
        if not self.blocks:
            raise UsageError("the model has no MoE layers to profile")
        self.layers = [i for i, _ in self.blocks]
        self.num_experts = None
        self.top_k = None
        self.coactivation = coactivation
        self.prompts = 0
        self._attached = False
        self.timer = None  # a StepTimer during a timed step (mlx_moe.profile --time-every)
        self._prompt_tokens = 0
        self._seen = [0] * len(self.blocks)
        self._forwards = []  # per forward: [(row, split, weights, ids)], still lazy
        self._counts = self._mass = self._pairs = None
        self._tokens = {p: 0 for p in PHASES}
        self.timing = None

    # -- attaching -------------------------------------------------------------------------
    def attach(self, timing=False):
        """Swaps the MoE blocks' classes for recording ones; ``timing``: also the attention
        modules' (``self_attn``), for timed steps."""
        for row, (_, block) in enumerate(self.blocks):
            object.__setattr__(block, "_mlx_moe_profiler", self)
            object.__setattr__(block, "_mlx_moe_profile_row", row)
            block.__class__ = _profiled_class(type(block))
        self._attention = []
        if timing:
            for layer in self._model_layers:
                attn = getattr(layer, "self_attn", None)
                if attn is not None:
                    object.__setattr__(attn, "_mlx_moe_profiler", self)
                    attn.__class__ = _timed_attention_class(type(attn))
                    self._attention.append(attn)
        self._attached = True
        return self

    def detach(self):
        for block in [b for _, b in self.blocks] + self._attention:
            base = getattr(type(block), "_mlx_moe_profiled_base", None)
            if base is not None:
                block.__class__ = base
            for a in ("_mlx_moe_profiler", "_mlx_moe_profile_row"):
                if a in block.__dict__:
                    object.__delattr__(block, a)
        self._attached = False

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()
        return False

    # -- recording -------------------------------------------------------------------------
    def begin(self, prompt_tokens):
        """A new sequence whose first ``prompt_tokens`` tokens are its prompt (prefill)."""
        self._prompt_tokens = int(prompt_tokens)
        self._seen = [0] * len(self.blocks)
        self.prompts += 1

    def record(self, row, weights, ids):
        """Called by a profiled block's ``route``: keeps the lazy arrays, no evaluation."""
        n = ids.shape[-2] if ids.ndim >= 2 else 1
        seen = self._seen[row]
        split = min(max(self._prompt_tokens - seen, 0), n)  # tokens [0, split) are prefill
        self._seen[row] = seen + n
        if row == 0:
            self._forwards.append([])
            if len(self._forwards) > 2:  # forwards before the previous one are evaluated
                self._flush(self._forwards[:-2])
                del self._forwards[:-2]
        elif not self._forwards:
            self._forwards.append([])
        self._forwards[-1].append((row, split, weights, ids))

    def _flush(self, forwards):
        for fwd in forwards:
            for row, split, weights, ids in fwd:
                self._add(row, split, np.asarray(ids.astype(mx_int32())), np.asarray(weights.astype(mx_f32())))

    def _add(self, row, split, ids, weights):
        k, E = ids.shape[-1], None
        if self._counts is None:
            E = self._guess_experts(row)
            self.num_experts, self.top_k = E, k
            L = len(self.blocks)
            self._counts = {p: np.zeros((L, E), np.int64) for p in PHASES}
            self._mass = {p: np.zeros((L, E), np.float64) for p in PHASES}
            if self.coactivation:
                self._pairs = np.zeros((L, E, E), np.int64)
        E = self.num_experts
        n = ids.shape[-2] if ids.ndim >= 2 else 1
        ids = ids.reshape(-1, n, k)
        weights = weights.reshape(-1, n, k)
        for phase, sl in (("prefill", slice(0, split)), ("decode", slice(split, n))):
            i = ids[:, sl].reshape(-1)
            if i.size == 0:
                continue
            self._counts[phase][row] += np.bincount(i, minlength=E)[:E]
            self._mass[phase][row] += np.bincount(i, weights=weights[:, sl].reshape(-1), minlength=E)[:E]
            if row == 0:
                self._tokens[phase] += i.size // k
        if self._pairs is not None:
            flat = ids.reshape(-1, k)
            for a in range(k):
                for b in range(a + 1, k):
                    np.add.at(self._pairs[row], (flat[:, a], flat[:, b]), 1)
                    np.add.at(self._pairs[row], (flat[:, b], flat[:, a]), 1)

    def _guess_experts(self, row):
        block = self.blocks[row][1]
        for owner in (block.routed, block):
            for a in ("num_experts", "n_experts", "n_routed_experts"):
                v = getattr(owner, a, None)
                if isinstance(v, int) and v > 0:
                    return v
        gate = getattr(block, block.gate_attr)
        return int(gate.weight.shape[0])

    def finish(self):
        """Reads every pending forward (call once generation is done)."""
        self._flush(self._forwards)
        self._forwards = []

    # -- results ---------------------------------------------------------------------------
    def result(self, model_name=None):
        self.finish()
        if self._counts is None:
            raise UsageError("nothing was routed: no tokens were profiled")
        phases = {}
        for p in PHASES + ("all",):
            counts = self._counts["prefill"] + self._counts["decode"] if p == "all" else self._counts[p]
            mass = self._mass["prefill"] + self._mass["decode"] if p == "all" else self._mass[p]
            tokens = sum(self._tokens.values()) if p == "all" else self._tokens[p]
            ent, norm, mom = balance(counts)
            phases[p] = {"tokens": int(tokens), "counts": counts.tolist(), "weight_mass": mass.tolist(),
                         "entropy_bits": ent, "entropy_norm": norm, "max_over_mean": mom}
        return {
            "version": SCHEMA_VERSION,
            "model": model_name,
            "num_experts": self.num_experts,
            "top_k": self.top_k,
            "moe_layers": self.layers,
            "prompts": self.prompts,
            "phases": phases,
            "coactivation": None if self._pairs is None else {"all": self._pairs.tolist()},
            "timing": self.timing,
        }


def mx_int32():
    import mlx.core as mx

    return mx.int32


def mx_f32():
    import mlx.core as mx

    return mx.float32


def balance(counts):
    """Per row of ``counts`` [L, E]: entropy (bits), entropy / log2 E, max / mean (None when empty)."""
    counts = np.asarray(counts, np.float64)
    E = counts.shape[-1]
    ent, norm, mom = [], [], []
    for row in counts:
        total = row.sum()
        if total == 0:
            ent.append(None), norm.append(None), mom.append(None)
            continue
        p = row / total
        h = float(-(p[p > 0] * np.log2(p[p > 0])).sum())
        ent.append(h)
        norm.append(h / math.log2(E) if E > 1 else 1.0)
        mom.append(float(row.max() / row.mean()))
    return ent, norm, mom


def summary(result, top=3):
    """The printed table: one line per MoE layer and phase."""
    k = result["top_k"]
    lines = [f"expert usage: {result['num_experts']} experts, top-{k}, {len(result['moe_layers'])} MoE layers, "
             f"{result['prompts']} prompt(s); tokens: prefill {result['phases']['prefill']['tokens']}, "
             f"decode {result['phases']['decode']['tokens']}",
             f"{'layer':>5} {'phase':<7} {'tokens':>7} {'entropy':>8} {'norm':>5} {'max/mean':>8}  hottest experts (share)"]
    for row, layer in enumerate(result["moe_layers"]):
        for p in PHASES + ("all",):
            ph = result["phases"][p]
            if ph["tokens"] == 0:
                continue
            c = np.asarray(ph["counts"][row])
            hot = np.argsort(-c, kind="stable")[:top]
            hot_s = " ".join(f"{int(e)}({c[e] / c.sum():.0%})" for e in hot)
            lines.append(f"{layer:>5} {p:<7} {ph['tokens']:>7} {ph['entropy_bits'][row]:>8.3f} "
                         f"{ph['entropy_norm'][row]:>5.2f} {ph['max_over_mean'][row]:>8.2f}  {hot_s}")
    timing = result.get("timing")
    if timing:
        ms = timing["per_token_ms"]
        parts = ", ".join(f"{p} {ms[p]:.2f} ms ({timing['share'][p]:.0%})" for p in StepTimer.PARTS)
        lines.append(f"decode step time ({timing['steps']} timed steps, evaluated at each boundary): "
                     f"{ms['total']:.2f} ms = {parts}")
        if timing.get("untimed_step_ms") is not None:
            lines.append(f"untimed decode step: {timing['untimed_step_ms']:.2f} ms")
    return "\n".join(lines)


def check_plot_available():
    """Fails with one line before any work when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(PLOT_HINT) from None


def plot_heatmap(result, path, phase="all"):
    """A PNG: MoE layers x experts, each cell the layer's share of selections."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(result["phases"][phase]["counts"], np.float64)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    L, E = share.shape
    fig, ax = plt.subplots(figsize=(min(4 + E * 0.12, 30), min(2 + L * 0.25, 30)))
    im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(L))
    ax.set_yticklabels([str(i) for i in result["moe_layers"]], fontsize=6 if L > 24 else 9)
    ax.set_title(f"expert usage ({phase}): share of the layer's selections")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(result, path):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, path)


def check_output(path, flag):
    """An output path whose folder exists (before any work)."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path}: is a folder")
    if not os.path.isdir(parent):
        raise UsageError(f"{flag} {path}: folder {parent} does not exist")


# -- prompts --------------------------------------------------------------------------------
def read_prompts(path):
    """``[str | list-of-messages]``: one prompt per line, or JSONL (each line a chat:
    a list of ``{role, content}`` messages or ``{"messages": [...]}``)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"--prompts {path}: not UTF-8 text (byte {e.start})") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UsageError(f"--prompts {path}: no prompts (the file is empty)")
    first = lines[0][1].lstrip()
    jsonl = False
    if first[:1] in "[{":
        try:
            json.loads(first)
            jsonl = True
        except json.JSONDecodeError:
            pass
    if not jsonl:
        return [line for _, line in lines]
    out = []
    for n, line in lines:
        try:
            v = json.loads(line)
        except json.JSONDecodeError as e:
            raise UsageError(f"--prompts {path}: line {n}: invalid JSON ({e.msg})") from None
        if isinstance(v, dict):
            v = v.get("messages")
        if (not isinstance(v, list) or not v or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in v)):
            raise UsageError(f"--prompts {path}: line {n}: a chat must be a non-empty list of "
                             '{"role": ..., "content": ...} messages, or {"messages": [...]}')
        out.append(v)
    return out


def encode(tokenizer, prompt, ignore_chat_template):
    # As mlx_moe.generate: a plain prompt goes through the chat template as a user message
    # unless ignored or absent (not imported from generate, which imports this module).
    if isinstance(prompt, str) and (ignore_chat_template or tokenizer.chat_template is None):
        ids = tokenizer.encode(prompt)
    else:
        if tokenizer.chat_template is None:
            raise UsageError("the prompts are chats (JSONL) but the tokenizer has no chat template")
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as e:  # jinja2's TemplateError, TypeError, ValueError
            raise UsageError(f"the chat template failed: {message(e)}") from None
        ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) == 0:
        raise UsageError("a prompt encodes to no tokens")
    return list(ids)


def profile_prompts(model, tokenizer, prompts, max_tokens=32, temp=0.0, coactivation=False,
                    ignore_chat_template=False, prefill_step=512, time_every=0):
    """Runs each prompt (prefill, then ``max_tokens`` sampled tokens) under a profiler.
    ``time_every`` N > 0: every N-th decode step is timed (router, experts, attention, rest)
    with an evaluation at each boundary; the others run as usual."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    sampler = make_sampler(temp)
    eos = set(getattr(tokenizer, "eos_token_ids", None) or ())
    encoded = [encode(tokenizer, p, ignore_chat_template) for p in prompts]
    prof = ExpertProfiler(model, coactivation=coactivation)
    timer = StepTimer() if time_every else None
    generated, step, plain_s, plain_n = 0, 0, 0.0, 0
    prof.attach(timing=bool(time_every))
    try:
        for ids in encoded:
            prof.begin(len(ids))
            cache = make_prompt_cache(model)
            x = mx.array(ids)[None]
            for s in range(0, x.shape[1] - 1, prefill_step):  # all but the last prompt token
                chunk = x[:, s:min(s + prefill_step, x.shape[1] - 1)]
                model(chunk, cache=cache)
                mx.eval([c.state for c in cache])
            y = x[:, -1:]
            for t in range(max_tokens):
                timed = timer is not None and t > 0 and step % time_every == 0  # t = 0: last prompt token
                t0 = time.perf_counter()
                if timed:
                    prof.timer = timer
                    timer.start()
                logits = model(y, cache=cache)[:, -1, :]
                tok = sampler(logits)
                if timed:
                    timer.stop(tok)
                    prof.timer = None
                else:
                    mx.eval(tok)
                    if t > 0:
                        plain_s += time.perf_counter() - t0
                        plain_n += 1
                step += t > 0
                generated += 1
                if int(tok.item()) in eos or t == max_tokens - 1:
                    break
                y = tok[None] if tok.ndim == 1 else tok
        prof.finish()
    finally:
        prof.timer = None
        prof.detach()
    if timer is not None:
        prof.timing = timer.result()
        if prof.timing is not None:
            prof.timing["untimed_step_ms"] = 1e3 * plain_s / plain_n if plain_n else None
            prof.timing["every"] = time_every
    return prof, generated


# -- command line ---------------------------------------------------------------------------
def build_parser():
    p = argparse.ArgumentParser(prog=PROG, description="Expert-usage profile of an MoE model over a set of prompts.")
    p.add_argument("--model", default=None, help="local folder or Hugging Face repo id (default: the shipped tiny model)")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="one prompt per line, or JSONL: one chat per line (a list of {role, content}, or {messages: [...]})")
    p.add_argument("--from", dest="from_json", default=None, metavar="FILE.json",
                   help="instead of running prompts: print the summary of a saved profile (mlx_moe.profile or "
                        "mlx_moe.generate --profile) and draw its --plot")
    p.add_argument("--max-tokens", "-m", type=positive_int, default=32, help="tokens generated per prompt (default: 32)")
    p.add_argument("--temp", type=checked(float, lambda v: math.isfinite(v) and v >= 0, "a number >= 0"), default=0.0,
                   help="sampling temperature; 0: greedy (default)")
    p.add_argument("--seed", type=checked(int, lambda v: v >= 0, "a whole number >= 0"), default=None)
    p.add_argument("--ignore-chat-template", action="store_true", help="plain prompts go in raw")
    p.add_argument("--output", "-o", default="expert_profile.json", metavar="FILE.json",
                   help="the JSON profile (default: expert_profile.json)")
    p.add_argument("--plot", default=None, metavar="FILE.png", help="a layers x experts heatmap (needs matplotlib)")
    p.add_argument("--coactivation", action="store_true", help="also count co-selected expert pairs (E x E per layer)")
    p.add_argument("--time-every", type=checked(int, lambda v: v >= 0, "a whole number >= 0"), default=0, metavar="N",
                   help="time every N-th decode step split into router, experts, attention and the rest, "
                        "with an evaluation at each boundary (slower than a plain step); 0: off (default)")
    add_backend_arg(p)
    add_quantize_args(p)
    add_verbose(p)
    return p


def read_profile(path):
    """A saved profile, checked enough to summarize and plot it."""
    with open(path, "rb") as f:
        try:
            r = json.loads(f.read().decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UsageError(f"--from {path}: not a JSON profile ({e})") from None
    ok = (isinstance(r, dict) and r.get("version") == SCHEMA_VERSION and isinstance(r.get("phases"), dict)
          and all(isinstance(r["phases"].get(p), dict) and "counts" in r["phases"][p] for p in PHASES + ("all",))
          and isinstance(r.get("moe_layers"), list))
    if not ok:
        raise UsageError(f"--from {path}: not an expert profile of version {SCHEMA_VERSION} "
                         "(written by mlx_moe.profile or mlx_moe.generate --profile)")
    return r


def main(argv):
    parser = build_parser()
    args = parser.parse_args(dash_values(parser, argv))
    quantize = quantize_spec(parser, args)
    if (args.prompts is None) == (args.from_json is None):
        parser.error("give one of --prompts FILE (run prompts) and --from FILE.json (a saved profile)")
    if args.plot is not None:
        check_plot_available()  # before loading anything
        check_output(args.plot, "--plot")
    if args.from_json is not None:
        result = read_profile(args.from_json)
        print(summary(result))
        if args.plot is not None:
            plot_heatmap(result, args.plot)
            print(f"wrote {args.plot}")
        return
    check_output(args.output, "--output")
    prompts = read_prompts(args.prompts)
    import mlx.core as mx

    from .loading import load

    if args.seed is not None:
        mx.random.seed(args.seed)
    model, tokenizer = load(args.model, quantize=quantize, backend=args.backend, progress=False)
    t0 = time.perf_counter()
    prof, generated = profile_prompts(model, tokenizer, prompts, args.max_tokens, args.temp,
                                      args.coactivation, args.ignore_chat_template, time_every=args.time_every)
    result = prof.result(args.model or "default_model")
    result["seconds"] = time.perf_counter() - t0
    result["generated_tokens"] = generated
    write_json(result, args.output)
    print(summary(result))
    print(f"wrote {args.output}")
    if args.plot is not None:
        plot_heatmap(result, args.plot)
        print(f"wrote {args.plot}")


def cli(argv=None):
    sys.exit(run(PROG, main, sys.argv[1:] if argv is None else list(argv)))


if __name__ == "__main__":
    cli()
