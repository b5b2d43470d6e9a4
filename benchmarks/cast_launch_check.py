"""Two launch savings of the block's PyTorch side, timed on a GPU before they are built (CUDA graphs, bf16):

1. The weight and bias gradients of the up- and down-projections as products with float32 outputs
   (``torch.mm(..., out_dtype=torch.float32, out=...)``) written into the parameters' gradient buffers, against
   today's bf16 product or column sum followed by a cast copy (``linear.py``, ``mixer_core.py``): two launches per
   projection fewer, if the products are no slower.
2. The forward's weight and bias casts of one ViL-T step (24 blocks x up/down weight and bias) as one
   ``torch._foreach_copy_`` against one cast each.

    python benchmarks/cast_launch_check.py     # on the GPU machine: us per call of each variant, and their agreement
"""
import torch


def graph_us(fn, calls: int, rounds: int = 5) -> float:
    """Best over ``rounds`` of the us per call of ``fn`` replayed ``calls`` times from one CUDA graph."""
    fn()
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    best = float('inf')
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / calls * 1e3)
    return best


def projection_gradients() -> None:
    """Item 1 at ViL-T's token counts (224 px b64, 512 px b32) and projections (up 192 -> 768, down 384 -> 192)."""
    for tokens in (12544, 32768):
        for out_features, in_features in ((768, 192), (192, 384)):
            grad = torch.randn(tokens, out_features, device='cuda', dtype=torch.bfloat16)
            x = torch.randn(tokens, in_features, device='cuda', dtype=torch.bfloat16)
            ones = torch.ones(1, tokens, device='cuda', dtype=torch.bfloat16)
            flat = torch.empty(out_features * (in_features + 1), device='cuda')
            weight_grad = flat[:out_features * in_features].view(out_features, in_features)
            bias_grad = flat[out_features * in_features:].view(1, out_features)

            def cast_after():
                weight_grad.copy_(grad.t() @ x)
                bias_grad.copy_(torch.mv(grad.t(), ones[0]))

            def float32_products():
                torch.mm(grad.t(), x, out_dtype=torch.float32, out=weight_grad)
                torch.mm(ones, grad, out_dtype=torch.float32, out=bias_grad)

            times = {name: graph_us(fn, 50) for name, fn in (('product + cast', cast_after),
                                                             ('float32 products', float32_products))}
            cast_after()
            reference = flat.clone()
            float32_products()
            error = ((flat - reference).abs().max() / reference.abs().max()).item()
            print(f'{tokens} tokens, weight {out_features}x{in_features}: '
                  + ', '.join(f'{name} {us:.1f} us' for name, us in times.items())
                  + f'; largest difference {error:.1e} of the largest gradient')


def forward_casts() -> None:
    """Item 2: the 96 casts of one ViL-T step."""
    shapes = [(768, 192), (768,), (192, 384), (192,)] * 24
    sources = [torch.randn(*shape, device='cuda') for shape in shapes]
    targets = [torch.empty(*shape, device='cuda', dtype=torch.bfloat16) for shape in shapes]
    times = {name: graph_us(fn, 10) for name, fn in (
        ('one cast each', lambda: [t.to(torch.bfloat16) for t in sources]),
        ('_foreach_copy_', lambda: torch._foreach_copy_(targets, sources)))}
    print('forward weight casts per step: ' + ', '.join(f'{name} {us:.1f} us' for name, us in times.items()))


if __name__ == '__main__':
    print(torch.cuda.get_device_name(), 'torch', torch.__version__)
    projection_gradients()
    forward_casts()
