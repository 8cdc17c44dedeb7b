"""kernels: see DESIGN.md section 2."""
