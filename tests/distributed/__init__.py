"""Context-parallel tests: spawned gloo process groups on the CPU (world sizes 2 and 4)."""
