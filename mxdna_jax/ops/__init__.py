"""Pure jnp kernels of MxDNA (no Flax): NMS, expert dispatch, deformable sampling, RoPE, attention.

Shape letters used across the package:
  B batch, L nucleotide length (padded, incl. [CLS]/[SEP]), T token capacity,
  D hidden size, N heads, H head dim, E experts (unit lengths 1..E), K deformable taps (3),
  V vocabulary, M flattened rows (B*L), G tiles, R rows per tile, F FFN width.
"""
