"""The benchmark: speed, memory and fidelity of every method on the same inputs (DESIGN.md section 8)."""
