"""The gradient index's choices and defaults (docs/design.md, "Gradient index"), without heavy imports:
the command line's parser reads them before anything loads."""

PROJECTION_KINDS = ("kronecker", "identity")
DEFAULT_K = 16  # per side and module (bergson's default: 16 x 16 = 256 numbers per module)
DEFAULT_DIMS = 1000  # numbers per document after mixing: 2,000 bytes in float16
DEFAULT_BALANCE = 0.5  # the side scales fit M^0.5: half of the damped inverse on each side of the product
ANN_CHOICES = ("flat", "ivf,pq")
DEFAULT_BATCH_SIZE = 8  # documents per forward and backward pass of a build
DEFAULT_SHARD_SIZE = 4096  # documents per shard file
