#!/usr/bin/env python3
"""Train the tiny Qwen3-MoE model that ships as mlx-moe's CLI default.

Everything needed to reproduce it ships with Python itself:

* Corpus: ``pydoc_data.topics.topics`` -- the stdlib's ~465 KB of English
  reference documentation used by ``help()`` -- its values concatenated in
  sorted key order, one document per topic, separated by ``<|endoftext|>``;
  hard-wrapped prose paragraphs are unwrapped to single lines (``reflow``).
* Tokenizer: a byte-level BPE trained with the ``tokenizers`` library on that
  corpus.
* Model: mlx-lm's own ``qwen3_moe.Model`` (this script deliberately does not
  import ``mlx_moe``), trained with AdamW + warmup/cosine LR on next-token
  cross-entropy (plus a small Switch-style load-balancing loss so that all
  experts get used), on CPU.

The result is written in Hugging Face ``qwen3_moe`` layout (per-expert weight
names, bf16, one ``model.safetensors``) so that both ``transformers`` and
``mlx_lm.load`` can read it.  Output goes to a temporary directory that is
renamed into place only when complete.

Reproduce the shipped model with::

    python examples/train_default_model.py

(defaults: --seed 0 --steps 800; ``--minutes M`` instead picks the step count
from a short timing calibration so training fits in about M minutes.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_flatten

from mlx_lm.models import qwen3_moe
from mlx_lm.models.base import create_attention_mask

EOS = "<|endoftext|>"

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "mlx_moe" / "default_model"

# --------------------------------------------------------------------------
# Model size
# --------------------------------------------------------------------------

VOCAB_SIZE = 2048
MODEL_CONFIG = dict(
    hidden_size=128,
    num_hidden_layers=2,
    intermediate_size=256,  # only used by dense layers; there are none
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    num_experts=8,
    num_experts_per_tok=2,
    moe_intermediate_size=128,
    decoder_sparse_step=1,
    mlp_only_layers=[],
    norm_topk_prob=True,
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    tie_word_embeddings=False,  # untied head: no extra compute, learns faster
    max_position_embeddings=2048,
)

PROMPTS = ["The for statement", "A list is", "The import statement"]
GREEDY_NOTE = (
    "mlx_lm.load of the saved bf16 folder + mlx_lm.generate, greedy (temp 0), "
    "max_tokens=60; on the CPU build of mlx the weights are upcast to float32 "
    "first (m.set_dtype(mx.float32)) because bf16 GatherMM is not implemented on CPU"
)


# --------------------------------------------------------------------------
# Corpus and tokenizer
# --------------------------------------------------------------------------


def reflow(doc: str) -> str:
    """Unwrap hard-wrapped prose paragraphs (blocks whose lines are all
    unindented and that are not headings) into single lines.  Indented blocks
    (code, grammar, tables, lists) are kept verbatim.  Without this ~1 in 12
    tokens is a mid-sentence newline, which a tiny model learns to emit
    greedily instead of words."""
    out = []
    for block in re.split(r"\n[ \t]*\n", doc.strip()):
        lines = block.split("\n")
        heading = any(l.strip() and set(l.strip()) <= set("*=-^~+#") for l in lines)
        if not heading and all(l and not l[0].isspace() for l in lines):
            block = " ".join(l.strip() for l in lines)
        out.append(block)
    return "\n\n".join(out)


def load_corpus() -> list[str]:
    """Stdlib documentation topics, in sorted key order, prose unwrapped."""
    from pydoc_data.topics import topics

    return [reflow(topics[k]) for k in sorted(topics)]


def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    return tok


def save_tokenizer(tok, out_dir: Path, max_len: int):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=max_len,
        clean_up_tokenization_spaces=False,
    )
    fast.save_pretrained(str(out_dir))
    # Make sure no chat template sneaks in: this is a base LM.
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for extra in ("chat_template.jinja", "chat_template.json"):
        (out_dir / extra).unlink(missing_ok=True)


def encode_corpus(tok, docs: list[str]) -> np.ndarray:
    eos_id = tok.token_to_id(EOS)
    ids: list[int] = []
    for d in docs:
        ids.extend(tok.encode(d).ids)
        ids.append(eos_id)
    return np.asarray(ids, dtype=np.int32)


# --------------------------------------------------------------------------
# Router load-balancing loss
# --------------------------------------------------------------------------

# mlx-lm's MoE block returns only its output; to add the usual Switch
# Transformer load-balancing term we wrap its __call__ to stash
# E * sum_i(f_i * P_i) for each layer (f: fraction of top-k slots routed to
# expert i, P: mean router probability of expert i).  The forward output is
# identical to mlx-lm's.
_AUX: list = []
_ORIG_MOE_CALL = qwen3_moe.Qwen3MoeSparseMoeBlock.__call__


def _moe_call_with_aux(self, x):
    if self.training:
        probs = mx.softmax(self.gate(x).astype(mx.float32), axis=-1)
        k = self.top_k
        inds = mx.stop_gradient(mx.argpartition(probs, kth=-k, axis=-1)[..., -k:])
        E = self.num_experts
        counts = (inds[..., None] == mx.arange(E)).astype(mx.float32)
        f = counts.reshape(-1, E).mean(axis=0) / k  # sums to 1
        P = probs.reshape(-1, E).mean(axis=0)
        _AUX.append(E * (mx.stop_gradient(f) * P).sum())
    return _ORIG_MOE_CALL(self, x)


qwen3_moe.Qwen3MoeSparseMoeBlock.__call__ = _moe_call_with_aux


# --------------------------------------------------------------------------
# Faster dense matmuls on the CPU build
# --------------------------------------------------------------------------

# The mlx CPU wheel links the reference (netlib) BLAS, for which x @ W.T (what
# nn.Linear and Embedding.as_linear compute) is ~2x slower than x @ W.  This
# linear does its forward on a contiguous copy of W.T and its backward as
# g @ W and g.T @ x, which are the fast layouts.  Same math, ~20-30% faster
# training steps here.
@mx.custom_function
def _linear(x, w):
    return x @ mx.contiguous(w.T)


@_linear.vjp
def _linear_vjp(primals, cotangent, output):
    x, w = primals
    g = cotangent
    dx = g @ w
    dw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    return dx, dw


def _fast_linear_call(self, x):
    y = _linear(x, self["weight"])
    if "bias" in self:
        y = y + self["bias"]
    return y


def use_fast_linear():
    nn.Linear.__call__ = _fast_linear_call
    nn.Embedding.as_linear = lambda self, x: _linear(x, self.weight)


# --------------------------------------------------------------------------
# Export to Hugging Face layout
# --------------------------------------------------------------------------


def to_hf_weights(model, args) -> dict:
    out = {}
    for name, w in tree_flatten(model.parameters()):
        if ".mlp.switch_mlp." in name:
            prefix, rest = name.split(".mlp.switch_mlp.")
            proj = rest.split(".")[0]  # gate_proj / up_proj / down_proj
            for e in range(w.shape[0]):
                out[f"{prefix}.mlp.experts.{e}.{proj}.weight"] = w[e]
        else:
            out[name] = w
    if args.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    return {k: v.astype(mx.bfloat16) for k, v in sorted(out.items())}


def hf_config(model_config: dict, vocab_size: int, eos_id: int) -> dict:
    cfg = {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        **model_config,
        "vocab_size": vocab_size,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "rope_scaling": None,
        "sliding_window": None,
        "use_sliding_window": False,
        "max_window_layers": model_config["num_hidden_layers"],
        "use_cache": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "bfloat16",
    }
    return cfg


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--steps", type=int, default=800)
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="pick --steps from a timing calibration to fit ~this many minutes "
        "(not bit-reproducible across machines; prefer --steps)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=40)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--aux-coef", type=float, default=0.02)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument(
        "--compile", action="store_true", help="mx.compile the step (slower on this CPU build)"
    )
    # Model size (defaults = the shipped model).
    p.add_argument("--vocab", type=int, default=VOCAB_SIZE)
    size_keys = ("hidden_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "num_experts",
                 "num_experts_per_tok", "moe_intermediate_size")
    for key in size_keys:
        p.add_argument("--" + key.replace("_", "-"), type=int, default=MODEL_CONFIG[key])
    p.add_argument("--tie-word-embeddings", type=int, choices=[0, 1],
                   default=int(MODEL_CONFIG["tie_word_embeddings"]))
    a = p.parse_args()
    model_config = dict(MODEL_CONFIG, **{k: getattr(a, k) for k in size_keys})
    model_config["tie_word_embeddings"] = bool(a.tie_word_embeddings)

    t_start = time.time()
    cpu_start = time.process_time()
    use_fast_linear()
    mx.set_default_device(mx.cpu)
    np_rng = np.random.RandomState(a.seed)
    mx.random.seed(a.seed)

    # ---- data
    docs = load_corpus()
    corpus_chars = sum(len(d) for d in docs)
    tok = train_tokenizer(docs, a.vocab)
    vocab_size = tok.get_vocab_size()
    eos_id = tok.token_to_id(EOS)
    data = encode_corpus(tok, docs)
    n_tok = int(data.size)
    print(
        f"corpus: {len(docs)} docs, {corpus_chars} chars, {n_tok} tokens, "
        f"vocab {vocab_size}",
        flush=True,
    )

    # Hold out the last 5% of the token stream for a validation loss.
    n_val = n_tok // 20
    train_data, val_data = data[:-n_val], data[-n_val:]
    L, B = a.seq_len, a.batch_size

    def sample_batch(arr):
        starts = np_rng.randint(0, arr.size - L - 1, size=B)
        x = np.stack([arr[s : s + L + 1] for s in starts])
        return mx.array(x[:, :-1]), mx.array(x[:, 1:])

    val_starts = np.arange(0, val_data.size - L - 1, L)
    val_batches = [
        (
            mx.array(np.stack([val_data[s : s + L] for s in val_starts[i : i + B]])),
            mx.array(np.stack([val_data[s + 1 : s + L + 1] for s in val_starts[i : i + B]])),
        )
        for i in range(0, len(val_starts), B)
    ]

    # ---- model
    args = qwen3_moe.ModelArgs(model_type="qwen3_moe", vocab_size=vocab_size, **model_config)
    model = qwen3_moe.Model(args)
    # Small-std normal init (HF initializer_range 0.02) for all matrices.
    init = nn.init.normal(std=0.02)
    model.apply(lambda w: init(w) if w.ndim >= 2 else w)
    n_params = sum(v.size for _, v in tree_flatten(model.parameters()))
    print(f"params: {n_params / 1e6:.2f}M", flush=True)

    def loss_fn(model, x, y):
        _AUX.clear()
        logits = model(x)
        ce = nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="mean")
        aux = sum(_AUX) / len(_AUX)
        _AUX.clear()
        return ce + a.aux_coef * aux, (ce, aux)

    def eval_val():
        model.eval()
        tot, n = 0.0, 0
        for x, y in val_batches:
            logits = model(x)
            l = nn.losses.cross_entropy(logits.astype(mx.float32), y, reduction="sum")
            tot += l.item()
            n += y.size
        model.train()
        return tot / n

    def make_step(total_steps):
        warm = min(a.warmup, max(1, total_steps // 10))
        sched = optim.join_schedules(
            [
                optim.linear_schedule(a.lr / warm, a.lr, warm),
                optim.cosine_decay(a.lr, total_steps - warm, a.min_lr),
            ],
            [warm],
        )
        opt = optim.AdamW(learning_rate=sched, betas=[0.9, 0.95], weight_decay=a.weight_decay)
        vg = nn.value_and_grad(model, lambda m, x, y: loss_fn(m, x, y))

        def step(x, y):
            (loss, (ce, aux)), grads = vg(model, x, y)
            grads, _ = optim.clip_grad_norm(grads, 1.0)
            opt.update(model, grads)
            return loss, ce, aux

        if a.compile:
            state = [model.state, opt.state, mx.random.state]
            step = mx.compile(step, inputs=state, outputs=state)
        return step, opt, sched

    model.train()
    total_steps = a.steps
    if a.minutes is not None:
        # Time a few steps on a throw-away copy of the optimiser, then restore
        # the initial weights so the real run starts from the same init.
        init_w = [(k, mx.array(v)) for k, v in tree_flatten(model.parameters())]
        step, _, _ = make_step(1000)
        x, y = sample_batch(train_data)
        mx.eval(step(x, y))
        t0 = time.time()
        for _ in range(10):
            mx.eval(step(x, y))
        dt = (time.time() - t0) / 10
        total_steps = max(50, int(a.minutes * 60 * 0.95 / dt))
        print(f"calibration: {dt * 1000:.0f} ms/step -> {total_steps} steps", flush=True)
        model.load_weights(init_w)
        np_rng = np.random.RandomState(a.seed)

    step, opt, sched = make_step(total_steps)
    t_train = time.time()
    cpu_train = time.process_time()
    ema = None
    log = []
    t_last = time.time()
    for it in range(1, total_steps + 1):
        x, y = sample_batch(train_data)
        loss, ce, aux = step(x, y)
        mx.eval(loss, ce, aux)
        ce_v = ce.item()
        ema = ce_v if ema is None else 0.98 * ema + 0.02 * ce_v
        if it % a.log_every == 0 or it == 1 or it == total_steps:
            now = time.time()
            el = now - t_train
            tps = it * B * L / el
            print(
                f"step {it}/{total_steps} ce {ce_v:.3f} (ema {ema:.3f}) aux {aux.item():.3f} "
                f"lr {sched(opt.step).item():.2e} {tps:.0f} tok/s "
                f"(last {now - t_last:.1f}s) {el:.0f}s",
                flush=True,
            )
            t_last = now
            log.append(dict(step=it, ce=round(ce_v, 4), ema=round(ema, 4), secs=round(el, 1)))
    train_secs = time.time() - t_train
    train_cpu_secs = time.process_time() - cpu_train
    val_loss = eval_val()
    print(f"final train ce (ema) {ema:.3f}, val ce {val_loss:.3f}", flush=True)

    # ---- export
    out = Path(a.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        cfg = hf_config(model_config, vocab_size, eos_id)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        weights = to_hf_weights(model, args)
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        save_tokenizer(tok, tmp, cfg["max_position_embeddings"])

        # Greedy samples from the saved bf16 model, loaded the normal way.
        from mlx_lm import generate, load

        m2, t2 = load(str(tmp))
        # The CPU build of mlx has no bf16 GatherMM ("Currently only supports
        # float32"), so upcast the bf16 weights for sampling on CPU.
        if mx.default_device() == mx.cpu:
            m2.set_dtype(mx.float32)
        samples = {}
        for pr in PROMPTS:
            samples[pr] = generate(m2, t2, prompt=pr, max_tokens=60, verbose=False)
            print(f"--- {pr!r} -> {samples[pr]!r}", flush=True)

        # Expert usage on the validation set (fraction of top-k slots per expert).
        usage = [np.zeros(args.num_experts) for _ in m2.model.layers]
        k = args.num_experts_per_tok
        for xv, _ in val_batches:
            h = m2.model.embed_tokens(xv)
            mask = create_attention_mask(h, None)
            for li, layer in enumerate(m2.model.layers):
                h = h + layer.self_attn(layer.input_layernorm(h), mask, None)
                xin = layer.post_attention_layernorm(h)
                inds = mx.argpartition(layer.mlp.gate(xin), kth=-k, axis=-1)[..., -k:]
                usage[li] += np.bincount(np.array(inds).ravel(), minlength=args.num_experts)
                h = h + layer.mlp(xin)
        usage = [(u / u.sum()).round(3).tolist() for u in usage]

        size_bytes = sum(f.stat().st_size for f in tmp.iterdir())
        cmd = "python examples/train_default_model.py " + " ".join(sys.argv[1:])
        training = {
            "description": "Tiny qwen3_moe base LM trained from scratch on Python's "
            "bundled documentation (pydoc_data.topics); CLI default/test model.",
            "command": cmd.strip(),
            "seed": a.seed,
            "steps": total_steps,
            "batch_size": B,
            "seq_len": L,
            "tokens_seen": total_steps * B * L,
            "optimizer": {
                "name": "AdamW",
                "lr": a.lr,
                "min_lr": a.min_lr,
                "warmup_steps": min(a.warmup, max(1, total_steps // 10)),
                "schedule": "linear warmup + cosine decay",
                "betas": [0.9, 0.95],
                "weight_decay": a.weight_decay,
                "grad_clip": 1.0,
                "router_aux_loss_coef": a.aux_coef,
            },
            "corpus": {
                "source": "pydoc_data.topics.topics values in sorted key order, "
                "hard-wrapped prose paragraphs unwrapped (see reflow()), "
                f"each followed by {EOS}",
                "python_version": platform.python_version(),
                "documents": len(docs),
                "chars": corpus_chars,
                "tokens": n_tok,
                "train_tokens": int(train_data.size),
                "val_tokens": int(val_data.size),
            },
            "tokenizer": {"type": "byte-level BPE (tokenizers)", "vocab_size": vocab_size},
            "params": int(n_params),
            "final_train_loss_ema": round(ema, 4),
            "final_val_loss": round(val_loss, 4),
            "train_wall_seconds": round(train_secs, 1),
            "train_cpu_seconds": round(train_cpu_secs, 1),
            "total_wall_seconds": round(time.time() - t_start, 1),
            "total_cpu_seconds": round(time.process_time() - cpu_start, 1),
            "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
            "tokens_per_second": round(total_steps * B * L / train_secs, 1),
            "expert_usage_val": usage,
            "greedy_samples": samples,
            "greedy_samples_note": GREEDY_NOTE,
            "loss_log": log,
            "versions": {
                "mlx": mx.__version__,
                "mlx_lm": __import__("mlx_lm").__version__,
                "tokenizers": __import__("tokenizers").__version__,
                "transformers": __import__("transformers").__version__,
            },
            "machine": f"{platform.machine()} {os.cpu_count()} cpus",
            "folder_bytes_without_training_json": size_bytes,
        }
        (tmp / "training.json").write_text(json.dumps(training, indent=2) + "\n")

        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
        os.chmod(out, 0o755)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"saved to {out} ({size_bytes / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
