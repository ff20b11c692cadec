"""Loss, perplexity, bits per token and word-level perplexity, with the LSTM state carried through the text."""

from __future__ import annotations

import contextlib
import functools
import math
import warnings

import torch
from torch import nn

from .data import EncodedSplit, Streams
from .model import LSTMLanguageModel


def autocast(device: torch.device, precision: str, cache: bool = True):
    """bf16 autocast, or nothing for fp32. `cache=False` for code recorded into a CUDA graph, where autocast's
    cache of cast weights must not be used."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)
    return contextlib.nullcontext()


@contextlib.contextmanager
def fp32_math(device: torch.device, tf32: bool):
    """Whether cuDNN, which runs nn.LSTM, may use TF32 tensor cores for fp32 on a CUDA GPU (Ampere or later)
    inside the block: the inputs of its products rounded to a 10-bit mantissa, the sums kept in fp32. PyTorch
    allows it by default; tf32=False computes in IEEE fp32, as the papers' GPUs did. The setting before the block
    comes back after it. Matmuls (the decoder) follow torch.set_float32_matmul_precision, IEEE by default, which
    wordlm leaves alone. On a CPU nothing changes.

    PyTorch's older flag is used, which every version in wordlm's range has (PyTorch 2.9 to 2.11 warn once that
    it will be deprecated; that warning is kept out of wordlm's output). Where a program has set the flags
    through both the older and the newer API, PyTorch refuses to read them, and they are left as they are."""
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            before = cudnn.allow_tf32
        except RuntimeError:  # PyTorch's "mix of the legacy and new APIs" refusal
            before = None
        else:
            cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        if before is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                cudnn.allow_tf32 = before


@functools.cache
def _runs_bf16_lstm(device: str) -> bool:
    """Whether an LSTM step runs under bf16 autocast on `device` ("cpu", "cuda", "cuda:1"). PyTorch hands a CPU
    LSTM to oneDNN, whose bf16 kernel needs AVX-512 (or Arm's bf16) and fails on, say, an AVX2-only CPU; on a CUDA
    GPU older than Ampere, autocast may refuse bf16 or the LSTM kernel lack it. So one tiny step, forward and
    backward, is tried once per device (its random weights drawn aside on the CPU: the caller's RNG stream is
    left as it was)."""
    dev = torch.device(device)
    with torch.random.fork_rng(devices=[]):
        lstm = torch.nn.LSTM(4, 4)
    try:
        lstm = lstm.to(dev)
        with torch.enable_grad(), torch.autocast(dev.type, dtype=torch.bfloat16):
            out, _ = lstm(torch.zeros(2, 1, 4, device=dev))
        out.float().sum().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
    except RuntimeError:
        return False
    return True


def bf16_supported(device: torch.device) -> bool:
    """Whether `device` can run the model under bf16 autocast."""
    return _runs_bf16_lstm(str(device))


def bf16_refusal(device: torch.device) -> str:
    """Why `device` cannot run bf16: the middle of a one-line error or note."""
    if device.type == "cpu":
        isa = torch.backends.cpu.get_cpu_capability()
        return f"this CPU ({isa}) has no bf16 LSTM kernel (oneDNN's needs AVX-512 or Arm bf16)"
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return (f"this GPU ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor}) cannot run "
                f"the LSTM in bf16 (that needs compute capability 8.0, Ampere, or later)")
    return f"this device ({device}) cannot run the LSTM in bf16"


def eval_window(batch_size: int, vocab_size: int, floor: int = 35) -> int:
    """Tokens per stream in one forward pass of an evaluation. The LSTM state is carried from window to window,
    so the length changes no figure (the tests check), only speed and memory: each window pays a fixed cost
    (the calls, the decoder and softmax launched once), which at one stream is most of the time, so long
    windows pay it less often. The logits of a window stay near 4M values (16 MB in fp32); never shorter than
    `floor` (the training window), never over 1,000."""
    return max(floor, min(1000, 4_000_000 // max(1, batch_size * vocab_size)))


@torch.no_grad()
def total_nll(model: LSTMLanguageModel, streams: Streams, seq_len: int = 70,
              precision: str = "fp32") -> tuple[float, int]:
    """Summed negative log-likelihood (nats) over every target of `streams`, and the number of targets.

    The state is never reset: each stream is read from start to end as one context. In fp32 the products are
    IEEE fp32 on a GPU too (`fp32_math`), whatever the training used.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    state = model.init_state(streams.batch_size)
    total = torch.zeros((), dtype=torch.float64, device=device)
    with autocast(device, precision), fp32_math(device, tf32=False):
        for row in range(0, streams.rows - 1, seq_len):
            x, y = streams.window(row, seq_len)
            nll, state = model.nll(x, y, state)
            total += nll.sum(dtype=torch.float64)
    model.train(was_training)
    return total.item(), streams.targets


def perplexity(loss: float) -> float:
    """exp(loss), and inf where that overflows a float (a diverged model: loss above about 709 nats)."""
    return math.exp(loss) if loss < 709.0 or math.isnan(loss) else math.inf


def report(nll: float, targets: int, split: EncodedSplit | None = None, subword: bool = False,
           unk_id: int | None = None) -> dict:
    """The figures users read. For subword tokenizers also word-level perplexity: the same total loss spread
    over the split's words (whitespace words plus one per line end, the unit PTB/WikiText results count), so
    it compares across tokenizers. When streams dropped a tail, the loss is scaled to the whole split.
    With `unk_id`, also how many of the split's tokens are <unk> (words the tokenizer never saw in training, or
    written <unk> in the text, as PTB does): predicting <unk> is easy, so many of them flatter the perplexity."""
    loss = nll / targets
    out = {"loss": loss, "ppl": perplexity(loss), "bits_per_token": loss / math.log(2), "tokens": targets}
    if split is not None and unk_id is not None:
        out["unk_tokens"] = int((split.ids[1:] == unk_id).sum())
        out["unk_share"] = out["unk_tokens"] / split.tokens
    if split is not None and subword:
        total_for_split = loss * split.tokens
        out["words"] = split.words
        out["word_ppl"] = perplexity(total_for_split / split.words)
    return out


@contextlib.contextmanager
def _lstm_backward_ready(model: nn.Module):
    """Gradients through the LSTMs of a model in eval mode (dynamic evaluation), on cuDNN's kernels.

    cuDNN refuses the backward pass of an LSTM outside training mode ("cudnn RNN backward can only be called in
    training mode"), and the model's own training mode would switch its dropouts on. So only the nn.LSTM modules
    go into training mode, with their own between-layer dropout at 0; the model's dropouts, weight drop and AR/TAR
    read the model's flag, which stays off. (On the CPU the flag changes nothing: the same kernels either way.)
    Everything is put back afterwards.
    """
    lstms = [m for m in model.modules() if isinstance(m, nn.LSTM)]
    saved = [(m.training, m.dropout) for m in lstms]
    try:
        for m in lstms:
            m.training, m.dropout = True, 0.0
        yield
    finally:
        for m, (training, dropout) in zip(lstms, saved, strict=True):
            m.training, m.dropout = training, dropout


def gradient_ms(model: LSTMLanguageModel, streams: Streams, seq_len: int, windows: int = 200) -> list[torch.Tensor]:
    """Mean squared gradient of every parameter over the first `windows` windows of `streams`: the scale that
    dynamic evaluation divides its updates by (Krause et al. 2018, "RMS with a global prior")."""
    params = [p for p in model.parameters() if p.requires_grad]
    ms = [torch.zeros_like(p) for p in params]
    was_training = model.training
    model.eval()
    state = model.init_state(streams.batch_size)
    n = 0
    with _lstm_backward_ready(model), fp32_math(next(model.parameters()).device, tf32=False):
        for row in range(0, streams.rows - 1, seq_len):
            if n == windows:
                break
            x, y = streams.window(row, seq_len)
            nll, state = model(x, (state[0].detach(), state[1].detach()), y)
            grads = torch.autograd.grad(nll.mean(), params)
            for m, g in zip(ms, grads, strict=True):
                m += g * g
            n += 1
    model.train(was_training)
    return [m / max(n, 1) for m in ms]


def dynamic_total_nll(model: LSTMLanguageModel, streams: Streams, seq_len: int, lr: float, decay: float,
                      ms: list[torch.Tensor], eps: float = 1e-5) -> tuple[float, int]:
    """Like `total_nll`, but the weights adapt to the text as it is read (dynamic evaluation).

    Each window is scored first, then one step is taken on its loss:
        theta <- theta - lr * g / (sqrt(MS) + eps) + min(1, decay * rms / mean(rms)) * (theta0 - theta)
    where rms = sqrt(MS) from `gradient_ms` on training text and theta0 are the trained weights; both terms read
    theta before the update, as in Krause et al.'s code. Updates are RMS-normalised, and a decay proportional to
    each weight's gradient scale pulls it back to the trained value. mean(rms) is over every weight; that code
    divides by the sum, over weight tensors, of each tensor's mean instead, so a lambda taken from it decays
    more here, by about the number of weight tensors.
    The model's weights are restored afterwards. With lr = 0 this is exactly static evaluation. IEEE fp32 on a
    GPU too, as `total_nll`.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    theta0 = [p.detach().clone() for p in params]
    rms = [m.sqrt() for m in ms]
    inv = [1.0 / (r + eps) for r in rms]  # computed once: each update is then one fused multiply-add
    mean_rms = torch.cat([r.flatten() for r in rms]).mean()
    pull = [torch.clamp(decay * r / mean_rms, max=1.0) for r in rms] if decay > 0 else None
    was_training = model.training
    model.eval()
    state = model.init_state(streams.batch_size)
    total = torch.zeros((), dtype=torch.float64, device=theta0[0].device)
    adapt = lr > 0  # with lr 0 the weights never leave theta0 (the decay pulls toward where they are)
    try:
        with (_lstm_backward_ready(model) if adapt else contextlib.nullcontext(),  # lr 0: static evaluation's mode
              fp32_math(theta0[0].device, tf32=False)):
            for row in range(0, streams.rows - 1, seq_len):
                x, y = streams.window(row, seq_len)
                with torch.set_grad_enabled(adapt):
                    nll, state = model(x, (state[0].detach(), state[1].detach()), y)
                total += nll.detach().sum(dtype=torch.float64)
                if not adapt:
                    continue
                grads = torch.autograd.grad(nll.mean(), params)
                with torch.no_grad():  # the pull as an interpolation, then one fused multiply-add per weight:
                    if pull is not None:  # both terms read theta before this update, as in the formula above
                        torch._foreach_lerp_(params, theta0, pull)  # theta + pull * (theta0 - theta)
                    torch._foreach_addcmul_(params, grads, inv, value=-lr)
    finally:
        with torch.no_grad():
            for p, p0 in zip(params, theta0, strict=True):
                p.copy_(p0)
        model.train(was_training)
    return total.item(), streams.targets
