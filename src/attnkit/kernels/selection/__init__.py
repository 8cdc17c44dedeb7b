"""Selection kernels: the fused scorers and top-k of content-routed selections (MoBA's gate, DSA's
indexer) and Quest's page bounds. Loaded through `kernels.load_module("selection.<name>")`."""
