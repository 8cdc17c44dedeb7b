"""Selection kernels: the fused scorers and top-k of content-routed selections (MoBA's and NSA's
routing, DSA's indexer, its radix select and the indexer fused with its top-k) and Quest's page
bounds. Loaded through `kernels.load_module("selection.<name>")`."""
