"""bf16 against fp32 matrix products on this CPU, at the shapes of the bench and paper models' decoder and gates.

    python benchmarks/dtype_probe.py

Where oneDNN has no bf16 LSTM kernel (an AVX2-only CPU), wordlm refuses bf16 instead of running the LSTM in
fp32 and the rest (embedding, decoder) in bf16; this says whether such a split would pay there: a ratio above
1 means bf16 is slower than fp32.
"""

import time

import torch

SHAPES = [  # (tokens of a batch-20, 35-step window, input width, output width), and what they are
    (700, 200, 10000, "2x200 decoder, PTB vocabulary"),
    (700, 200, 33278, "2x200 decoder, WikiText-2 vocabulary"),
    (700, 650, 10000, "2x650 decoder, PTB vocabulary"),
    (700, 200, 800, "2x200 gates (input to 4 x 200)"),
]


def seconds_per_product(a: torch.Tensor, b: torch.Tensor, budget: float = 1.0) -> float:
    for _ in range(2):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < budget:
        a @ b
        n += 1
    return (time.perf_counter() - start) / n


def main() -> None:
    torch.manual_seed(0)
    print(f"# torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; {time.strftime('%Y-%m-%d %H:%M')}")
    print("| product (m x k x n) | what | fp32 ms | bf16 ms | bf16 time / fp32 time |")
    print("| --- | --- | ---: | ---: | ---: |")
    for m, k, n, what in SHAPES:
        a, b = torch.randn(m, k), torch.randn(k, n)
        fp32 = seconds_per_product(a, b)
        bf16 = seconds_per_product(a.bfloat16(), b.bfloat16())
        print(f"| {m} x {k} x {n} | {what} | {fp32 * 1e3:.2f} | {bf16 * 1e3:.2f} | {bf16 / fp32:.2f} |", flush=True)


if __name__ == "__main__":
    main()
