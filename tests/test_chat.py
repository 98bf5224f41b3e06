"""mlx_moe.chat: the KV cache kept across turns (in process), and the REPL through a
pseudo-terminal (Ctrl-C stops an answer, not the program; /reset; /exit) and through stdin."""

import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest
from mlx_lm.generate import stream_generate

import mlx_moe
from mlx_moe.chat import Conversation
from mlx_moe.loading import DEFAULT_MODEL
from mlx_moe.server.api import render_chat

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def templated(tmp_path_factory):
    """The default model with a ChatML chat template (it ships without one)."""
    d = tmp_path_factory.mktemp("templated") / "model"
    shutil.copytree(DEFAULT_MODEL, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = CHATML
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    return mlx_moe.load(str(d), progress=False)


def fresh_answer(model, tokenizer, messages, max_tokens):
    ids = render_chat(tokenizer, messages)
    return "".join(r.text for r in stream_generate(model, tokenizer, ids, max_tokens=max_tokens))


def test_kv_cache_is_kept_across_turns(templated):
    model, tokenizer = templated
    conv = Conversation(model, tokenizer, system_prompt="You explain Python.")
    conv.reply("What is a list?", max_tokens=12)
    first = dict(conv.last)
    assert first["cached_tokens"] == 0 and first["prefilled_tokens"] == first["prompt_tokens"]
    history = list(conv.messages)
    a2 = conv.reply("And a tuple?", max_tokens=12)
    second = conv.last
    # the history (previous prompt and answer) came from the cache: only the new turn was prefilled
    assert second["cached_tokens"] >= first["prompt_tokens"] + first["generated_tokens"] - 1, (first, second)
    assert second["prefilled_tokens"] == second["prompt_tokens"] - second["cached_tokens"]
    assert conv.cache[0].offset == len(conv.cache_tokens)
    # and the answer is the one a fresh prefill of the whole conversation gives
    assert a2 == fresh_answer(model, tokenizer, history + [{"role": "user", "content": "And a tuple?"}], 12)
    conv.reset()
    conv.reply("What is a list?", max_tokens=4)
    assert conv.last["cached_tokens"] == 0


def test_stopped_answer_keeps_a_consistent_cache(templated):
    model, tokenizer = templated
    conv = Conversation(model, tokenizer)
    n = []
    conv.reply("What is a dict?", on_text=lambda s: n.append(s), should_stop=lambda: len(n) >= 3, max_tokens=200)
    assert conv.last["stopped"] and conv.last["generated_tokens"] == 3
    assert conv.cache[0].offset == len(conv.cache_tokens)
    history = list(conv.messages)
    a2 = conv.reply("Go on.", max_tokens=8)
    assert conv.last["cached_tokens"] > 0
    assert a2 == fresh_answer(model, tokenizer, history + [{"role": "user", "content": "Go on."}], 8)


class Term:
    """Reads a pty's master side; ``until(marker)`` consumes output up to and including ``marker``
    and keeps what came after it for the next call."""

    def __init__(self, fd):
        self.fd, self.buf = fd, b""

    def until(self, marker, timeout=30):
        end = time.time() + timeout
        while marker not in self.buf:
            r, _, _ = select.select([self.fd], [], [], max(0.0, end - time.time()))
            if not r:
                raise AssertionError(f"timed out waiting for {marker!r}; got {self.buf[-500:]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the child closed the terminal
                chunk = b""
            if not chunk:
                raise AssertionError(f"terminal closed before {marker!r}; got {self.buf[-500:]!r}")
            self.buf += chunk
        i = self.buf.index(marker) + len(marker)
        out, self.buf = self.buf[:i], self.buf[i:]
        return out


def test_repl_through_a_pty_ctrl_c_stops_the_answer_not_the_program():
    # No fork of this (threaded) process: a small launcher, started by subprocess, makes itself a
    # session leader, opens the pty's slave (its controlling terminal from then on) and execs the chat.
    fd, slave = os.openpty()
    launcher = ("import os, sys; os.setsid(); t = os.open(sys.argv[1], os.O_RDWR); "
                "[os.dup2(t, i) for i in (0, 1, 2)]; os.execv(sys.executable, [sys.executable] + sys.argv[2:])")
    proc = subprocess.Popen([sys.executable, "-c", launcher, os.ttyname(slave), "-m", "mlx_moe.chat",
                             "--max-tokens", "2000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, close_fds=True)
    term = Term(fd)
    try:
        term.until(b">> ", 60)
        os.write(fd, b"What is a list?\r")
        term.until(b"SUITE")  # the answer is streaming (the model's first words)
        os.write(fd, b"\x03")  # Ctrl-C through the terminal: SIGINT to the foreground process
        out = term.until(b"[stopped]")
        term.until(b">> ")
        assert out.count(b"\n") < 1500  # stopped long before 2000 tokens
        os.write(fd, b"\x03")  # Ctrl-C at the prompt: a fresh prompt, still running
        term.until(b">> ")
        os.write(fd, b"/reset\r")
        term.until(b"[conversation reset]")
        os.write(fd, b"/exit\r")
        end = time.time() + 20
        while proc.poll() is None:
            if time.time() > end:
                raise AssertionError("chat did not exit on /exit")
            try:  # keep draining the terminal
                if select.select([fd], [], [], 0.1)[0]:
                    os.read(fd, 4096)
            except OSError:
                pass
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(fd)
        os.close(slave)  # held open until here: a pty whose slave nobody holds reads as closed


def test_repl_through_stdin():
    r = subprocess.run([sys.executable, "-m", "mlx_moe.chat", "--max-tokens", "8", "--stats"],
                       input="What is a list?\n/help\n/reset\nA tuple?\n", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr  # end of input exits 0
    assert r.stdout.count("prompt tokens") == 2 and "[conversation reset]" in r.stdout and "/exit" in r.stdout
