"""layers: see DESIGN.md section 2."""
