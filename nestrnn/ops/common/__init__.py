"""What the whole-sequence op (``ops/nested_lstm``) and the generic path (``ops/outer_lstm``) share:
level types and dtypes (``levels``), the C kernel and its loader (``native``), the buffer pool
(``workspace``), parameter gradients after a time loop (``gradients``) and the cache of compiled
libraries (``build_cache``). Nothing here imports either op package.
"""
