"""How the model's computations run, picked by the Runtime (model/runtime.py); a reader who only
wants the model can skip this package.

- attention.py: causal attention over a segment (one masked softmax, query/key blocks with an
  online softmax, or cuDNN), within chunks, and over a KV cache (dense or in blocks).
- experts.py: the routed experts over token copies: sorted by expert through a grouped GEMM
  (ragged_dot) or CPU rounds of batched matmuls, switched per copy, or densely (the reference);
  the grouped kernel is also the body of expert parallelism (sharding/).
- views.py: split views of the stored parameter tree and KV cache for CPU inference.
"""
