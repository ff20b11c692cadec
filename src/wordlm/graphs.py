"""CUDA graphs: how train.cuda_graphs records and replays the training step (`CudaGraphs`, the backend the
training loop uses), and evaluation replayed from recorded windows (`RecordedEvaluation`: validation under
train.cuda_graphs, and `wordlm eval --cuda-graphs`). The tests swap the backend for a CPU stand-in."""

from __future__ import annotations

import contextlib
import functools

import torch

from .data import Streams
from .evaluate import autocast, fp32_math


class CudaGraphs:
    """How train.cuda_graphs records and runs the step: PyTorch's recipe for whole-step capture. Eager steps (the
    warm-up before recording, and a window length's first step) run on a side stream, and the step is recorded
    on that same stream; a replay is one launch on the current stream.

    Every recording (one per window length) allocates from one shared memory pool, so that many lengths need
    not each hold a step's worth of memory. Replays may come in any order: that is safe here because they never
    run at the same time and no replay reads a pool tensor another one wrote. What a step keeps (weights,
    optimizer state, the LSTM state, the counters) lives outside the pool, and every replay writes its
    gradients afresh; a recorded evaluation window keeps its LSTM state and summed loss outside the pool too."""

    @staticmethod
    def supports(device: torch.device) -> bool:
        return device.type == "cuda"

    def __init__(self):
        self.stream = torch.cuda.Stream()
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: list = []

    @contextlib.contextmanager
    def eager(self):
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            yield
        torch.cuda.current_stream().wait_stream(self.stream)

    def capture(self, fn):
        graph = torch.cuda.CUDAGraph()
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            fn()
        torch.cuda.current_stream().wait_stream(self.stream)
        self.graphs.append(graph)
        return graph.replay


class NotRecordable(RuntimeError):
    """A forward pass that cannot be recorded (a host read or a data-dependent shape inside it)."""


class RecordedEvaluation:
    """Evaluation with recorded windows: the forward pass over one window (eval mode, no gradient) recorded per
    window length and replayed along the text, with the LSTM state and the summed NLL in fixed buffers that
    each replay updates in place. It computes what evaluate.total_nll does (the tests compare the two), with one
    launch per window instead of the forward's operations one by one, which at evaluation's small batches is
    what the time goes to. Validation under train.cuda_graphs and `wordlm eval --cuda-graphs` use it. As for
    the training step, a length is recorded the second time it comes (so a text's shorter last window is
    recorded on the second pass). A new model to evaluate (NT-ASGD's average, once it starts) has other weight
    tensors, so its windows are recorded anew, as they are for another number of streams or precision."""

    def __init__(self, backend):
        self.backend = backend
        self.model = self.key = None
        self.seen: set[int] = set()
        self.windows: dict = {}  # window length -> (replay, x buffer, y buffer)
        self.recordings = self.replays = 0

    @torch.no_grad()
    def total_nll(self, model, streams: Streams, seq_len: int, precision: str,
                  before_recording=lambda: None) -> tuple[float, int]:
        with fp32_math(next(model.parameters()).device, tf32=False):  # as evaluate.total_nll: recorded so too
            return self._total_nll(model, streams, seq_len, precision, before_recording)

    def _total_nll(self, model, streams: Streams, seq_len: int, precision: str,
                   before_recording) -> tuple[float, int]:
        if (model, streams.batch_size, precision) != self.key:  # recordings are for one model, batch, precision
            self.key, self.model, self.seen, self.windows = (model, streams.batch_size, precision), model, set(), {}
            self.state = model.init_state(streams.batch_size)
            self.total = torch.zeros((), dtype=torch.float64, device=self.state[0].device)
        was_training = model.training
        model.eval()
        for t in (*self.state, self.total):
            t.zero_()
        try:
            for row in range(0, streams.rows - 1, seq_len):
                x, y = streams.window(row, seq_len)
                n = x.shape[0]
                if n not in self.windows and n in self.seen:
                    before_recording()
                    gx, gy = x.clone(), y.clone()
                    try:
                        replay = self.backend.capture(functools.partial(self._window, gx, gy, precision))
                    except RuntimeError as e:
                        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                        raise NotRecordable(reason) from None
                    self.windows[n] = (replay, gx, gy)
                    self.recordings += 1
                if n in self.windows:
                    replay, gx, gy = self.windows[n]
                    gx.copy_(x)
                    gy.copy_(y)
                    replay()
                    self.replays += 1
                else:
                    self.seen.add(n)
                    with self.backend.eager():
                        self._window(x, y, precision)
        finally:
            model.train(was_training)
        return self.total.item(), streams.targets

    def _window(self, x: torch.Tensor, y: torch.Tensor, precision: str) -> None:
        with autocast(x.device, precision, cache=False):
            nll, state = self.model.nll(x, y, self.state)
        self.total += nll.sum(dtype=torch.float64)
        for dst, src in zip(self.state, state, strict=True):
            dst.copy_(src)
